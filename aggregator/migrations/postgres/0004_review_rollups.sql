-- sci-aggregator schema 4 (postgres): what optimisation reviews read (#15).
-- request_cpu_rollup: per host step, service and scenario, the requests of
-- each log2 bucket of per-request CPU time (bin i: 2^(i-1) <= t < 2^i ns);
-- request_cpu_total_rollup: their exact CPU sum and the energy it stands for
-- (sum_cpu_ns x energy_j_per_cpu_ns of each window), so merged histograms
-- give energy per transaction. host_service_rollup: CPU of each service on
-- each host per host step (which pool a host belongs to).
CREATE TABLE request_cpu_rollup (
    bucket_s BIGINT NOT NULL, service TEXT NOT NULL, scenario TEXT NOT NULL, bin BIGINT NOT NULL,
    requests DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (bucket_s, service, scenario, bin));
CREATE TABLE request_cpu_total_rollup (
    bucket_s BIGINT NOT NULL, service TEXT NOT NULL, scenario TEXT NOT NULL,
    requests DOUBLE PRECISION NOT NULL, cpu_ns DOUBLE PRECISION NOT NULL,
    energy_j DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (bucket_s, service, scenario));
CREATE TABLE host_service_rollup (
    bucket_s BIGINT NOT NULL, datacenter TEXT NOT NULL, host TEXT NOT NULL, service TEXT NOT NULL,
    cpu_ns DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (bucket_s, datacenter, host, service));
