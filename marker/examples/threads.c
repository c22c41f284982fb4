/*
 * Several threads mark flows concurrently; the library's counters must equal
 * what the threads did. Usage: threads <threads> <flows-per-thread>
 * Build: cc -I marker/include threads.c -L<dir> -lsci_marker -lpthread
 * Prints one line per scenario: "<code> <begun> <completed> <failed>" and
 * exits 1 when a counter differs from the expected figure.
 */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>

#include "sci_marker.h"

static long flows;

static void *worker(void *arg) {
    long id = (long)arg;
    for (long i = 0; i < flows; i++) {
        uint32_t code = (uint32_t)((id + i) % 4) + 1;
        sci_scenario_begin(code);
        sci_scenario_end(code, i % 5 != 0); /* every fifth flow fails */
    }
    return NULL;
}

int main(int argc, char **argv) {
    if (argc != 3) {
        fprintf(stderr, "usage: %s <threads> <flows-per-thread>\n", argv[0]);
        return 2;
    }
    long threads = atol(argv[1]);
    flows = atol(argv[2]);
    pthread_t ids[64];
    if (threads < 1 || threads > 64 || flows < 1) {
        fprintf(stderr, "threads must be 1..64 and flows >= 1\n");
        return 2;
    }
    if (sci_scenario_begin_name("credit") != (int)SCI_CREDIT || sci_scenario_begin_name("loan") != -1) {
        fprintf(stderr, "sci_scenario_begin_name maps names wrongly\n");
        return 1;
    }
    sci_scenario_end(SCI_CREDIT, 1);
    for (long t = 0; t < threads; t++) pthread_create(&ids[t], NULL, worker, (void *)t);
    for (long t = 0; t < threads; t++) pthread_join(ids[t], NULL);

    /* Expected figures, computed the same way the workers chose codes. */
    uint64_t begun[5] = {0}, ok[5] = {0}, failed[5] = {0};
    begun[SCI_CREDIT] = 1;
    ok[SCI_CREDIT] = 1;
    for (long t = 0; t < threads; t++)
        for (long i = 0; i < flows; i++) {
            uint32_t code = (uint32_t)((t + i) % 4) + 1;
            begun[code]++;
            if (i % 5 != 0) ok[code]++; else failed[code]++;
        }
    int status = 0;
    for (uint32_t c = SCI_CREDIT; c <= SCI_QUERY; c++) {
        printf("%u %llu %llu %llu\n", c, (unsigned long long)sci_scenario_begun(c),
               (unsigned long long)sci_scenario_completed(c), (unsigned long long)sci_scenario_failed(c));
        if (sci_scenario_begun(c) != begun[c] || sci_scenario_completed(c) != ok[c] ||
            sci_scenario_failed(c) != failed[c])
            status = 1;
    }
    return status;
}
