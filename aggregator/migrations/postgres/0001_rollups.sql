-- sci-aggregator schema 1 (PostgreSQL; plain SQL, no extension, so that
-- PostgreSQL-compatible distributed engines run it too). Sums are DOUBLE PRECISION (REAL
-- affinity): a window is split across buckets in proportion to time.
CREATE TABLE window_keys (
    host TEXT NOT NULL, agent_instance TEXT NOT NULL, seq BIGINT NOT NULL,
    end_ns BIGINT NOT NULL, digest BYTEA NOT NULL,
    PRIMARY KEY (host, agent_instance, seq));
CREATE INDEX window_keys_end ON window_keys (end_ns);
CREATE TABLE windows_raw (
    end_ns BIGINT NOT NULL, host TEXT NOT NULL, agent_instance TEXT NOT NULL,
    seq BIGINT NOT NULL, payload BYTEA NOT NULL) PARTITION BY RANGE (end_ns);
-- One partition per UTC day (windows_raw_d<day number>), created at ingest;
-- retention drops whole partitions.
CREATE TABLE hosts (
    host TEXT PRIMARY KEY, datacenter TEXT NOT NULL,
    first_start_ns BIGINT NOT NULL, last_end_ns BIGINT NOT NULL);
CREATE TABLE fleet_rollup (
    bucket_s BIGINT NOT NULL, datacenter TEXT NOT NULL, intensity_source TEXT NOT NULL,
    energy_source TEXT NOT NULL, energy_model TEXT NOT NULL, share_source TEXT NOT NULL,
    windows_ended DOUBLE PRECISION NOT NULL, host_s DOUBLE PRECISION NOT NULL,
    energy_j DOUBLE PRECISION NOT NULL, idle_energy_j DOUBLE PRECISION NOT NULL,
    estimated_energy_j DOUBLE PRECISION NOT NULL, unattributed_energy_j DOUBLE PRECISION NOT NULL,
    operational_g DOUBLE PRECISION NOT NULL, embodied_g DOUBLE PRECISION NOT NULL,
    busy_cpu_ns DOUBLE PRECISION NOT NULL, idle_cpu_ns DOUBLE PRECISION NOT NULL,
    steal_cpu_ns DOUBLE PRECISION NOT NULL, unattributed_cpu_ns DOUBLE PRECISION NOT NULL,
    intensity_x_s DOUBLE PRECISION NOT NULL, pue_x_s DOUBLE PRECISION NOT NULL,
    te_x_s DOUBLE PRECISION NOT NULL, el_x_s DOUBLE PRECISION NOT NULL, share_x_s DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (bucket_s, datacenter, intensity_source, energy_source, energy_model, share_source));
CREATE TABLE scenario_rollup (
    bucket_s BIGINT NOT NULL, datacenter TEXT NOT NULL, scenario TEXT NOT NULL,
    transactions DOUBLE PRECISION NOT NULL, cpu_ns DOUBLE PRECISION NOT NULL,
    energy_j DOUBLE PRECISION NOT NULL, idle_energy_j DOUBLE PRECISION NOT NULL,
    carbon_g DOUBLE PRECISION NOT NULL, embodied_g DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (bucket_s, datacenter, scenario));
CREATE TABLE host_rollup (
    bucket_s BIGINT NOT NULL, host TEXT NOT NULL, datacenter TEXT NOT NULL,
    host_s DOUBLE PRECISION NOT NULL, energy_j DOUBLE PRECISION NOT NULL,
    idle_energy_j DOUBLE PRECISION NOT NULL, estimated_energy_j DOUBLE PRECISION NOT NULL,
    carbon_g DOUBLE PRECISION NOT NULL, embodied_g DOUBLE PRECISION NOT NULL,
    busy_cpu_ns DOUBLE PRECISION NOT NULL, idle_cpu_ns DOUBLE PRECISION NOT NULL,
    transactions DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (bucket_s, host, datacenter));
CREATE TABLE service_rollup (
    bucket_s BIGINT NOT NULL, datacenter TEXT NOT NULL, service TEXT NOT NULL, scenario TEXT NOT NULL,
    cpu_ns DOUBLE PRECISION NOT NULL, energy_j DOUBLE PRECISION NOT NULL,
    idle_energy_j DOUBLE PRECISION NOT NULL, carbon_g DOUBLE PRECISION NOT NULL,
    embodied_g DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (bucket_s, datacenter, service, scenario));
CREATE TABLE profile_rollup (
    bucket_s BIGINT NOT NULL, service TEXT NOT NULL, scenario TEXT NOT NULL, stack TEXT NOT NULL,
    samples DOUBLE PRECISION NOT NULL, energy_j DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (bucket_s, service, scenario, stack));
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
