-- sci-aggregator schema 5 (postgres): per-request CPU histograms in log-linear
-- buckets (issue 24; agent-common's request_cpu module: 16 equal
-- sub-buckets per power of two, bin = t below 16 ns) instead of log2 bins,
-- and per data centre (reviews of one data centre). Rows stored before
-- are converted: log2 bin i = [2^(i-1), 2^i) is exactly the log-linear
-- bins 16(i-4) .. 16(i-4)+15 (i >= 5; below, the single-ns bins it spans;
-- the last, [2^62, 2^64), 32 of them), all of one width, so its requests
-- spread evenly over them read the same percentiles as the linear
-- interpolation inside the log2 bin did. Their data centre was not
-- recorded: they get '(unknown)', counted in fleet-wide reviews only.
CREATE TABLE request_cpu_rollup_v5 (
    bucket_s BIGINT NOT NULL, datacenter TEXT NOT NULL, service TEXT NOT NULL,
    scenario TEXT NOT NULL, bin BIGINT NOT NULL,
    requests DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (bucket_s, datacenter, service, scenario, bin));
WITH RECURSIVE sub(k) AS (SELECT 0 UNION ALL SELECT k + 1 FROM sub WHERE k < 31),
old AS (
    SELECT bucket_s, service, scenario, bin, requests,
        CASE bin WHEN 0 THEN 1 WHEN 1 THEN 1 WHEN 2 THEN 2 WHEN 3 THEN 4 WHEN 4 THEN 8
            WHEN 63 THEN 32 ELSE 16 END AS width
    FROM request_cpu_rollup)
INSERT INTO request_cpu_rollup_v5 (bucket_s, datacenter, service, scenario, bin, requests)
SELECT old.bucket_s, '(unknown)', old.service, old.scenario,
    CASE WHEN old.bin = 0 THEN 0 WHEN old.bin <= 4 THEN old.width + sub.k
        ELSE (old.bin - 4) * 16 + sub.k END,
    old.requests / old.width
FROM old JOIN sub ON sub.k < old.width;
DROP TABLE request_cpu_rollup;
ALTER TABLE request_cpu_rollup_v5 RENAME TO request_cpu_rollup;
CREATE TABLE request_cpu_total_rollup_v5 (
    bucket_s BIGINT NOT NULL, datacenter TEXT NOT NULL, service TEXT NOT NULL,
    scenario TEXT NOT NULL,
    requests DOUBLE PRECISION NOT NULL, cpu_ns DOUBLE PRECISION NOT NULL,
    energy_j DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (bucket_s, datacenter, service, scenario));
INSERT INTO request_cpu_total_rollup_v5
SELECT bucket_s, '(unknown)', service, scenario, requests, cpu_ns, energy_j
FROM request_cpu_total_rollup;
DROP TABLE request_cpu_total_rollup;
ALTER TABLE request_cpu_total_rollup_v5 RENAME TO request_cpu_total_rollup;
