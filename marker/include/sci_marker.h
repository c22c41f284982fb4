/*
 * sci_marker.h: business-scenario markers followed by the sci-cf agent.
 *
 * Link with -lsci_marker (libsci_marker.so). Call sci_scenario_begin(code)
 * when a thread starts one flow of a scenario and sci_scenario_end(code, ok)
 * when it is done; ok != 0 counts one completed transaction (TA_i).
 * The agent attaches uprobes to these two symbols; without it each call
 * costs one atomic increment.
 */
#ifndef SCI_MARKER_H
#define SCI_MARKER_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Scenario codes of T/CQJR 032.2 (weights alpha: 24, 7, 3, 1). */
#define SCI_NONE 0u
#define SCI_CREDIT 1u    /* 授信 credit granting */
#define SCI_DRAWDOWN 2u  /* 支用 drawdown */
#define SCI_REPAYMENT 3u /* 还款 repayment */
#define SCI_QUERY 4u     /* 查询 query */

void sci_scenario_begin(uint32_t scenario);
void sci_scenario_end(uint32_t scenario, int ok);

/* Begins the named scenario ("credit", "drawdown", "repayment", "query" or
 * the Chinese names); returns its code, or -1 (nothing begun) if unknown. */
int sci_scenario_begin_name(const char *name);

/* Process-local counters (ground truth for tests and self-checks). */
uint64_t sci_scenario_begun(uint32_t scenario);
uint64_t sci_scenario_completed(uint32_t scenario);
uint64_t sci_scenario_failed(uint32_t scenario);

#ifdef __cplusplus
}
#endif

#endif /* SCI_MARKER_H */
