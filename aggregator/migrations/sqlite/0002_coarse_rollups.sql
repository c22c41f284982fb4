-- sci-aggregator schema 2 (SQLite): coarser copies of the rollups, written at
-- ingest beside the fine ones, so that a long query reads whole hours (fleet,
-- scenario) or days (host, service, profile) and only its edges finely.
CREATE TABLE fleet_rollup_h (
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
    PRIMARY KEY (bucket_s, datacenter, intensity_source, energy_source, energy_model, share_source)) WITHOUT ROWID;
CREATE TABLE scenario_rollup_h (
    bucket_s BIGINT NOT NULL, datacenter TEXT NOT NULL, scenario TEXT NOT NULL,
    transactions DOUBLE PRECISION NOT NULL, cpu_ns DOUBLE PRECISION NOT NULL,
    energy_j DOUBLE PRECISION NOT NULL, idle_energy_j DOUBLE PRECISION NOT NULL,
    carbon_g DOUBLE PRECISION NOT NULL, embodied_g DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (bucket_s, datacenter, scenario)) WITHOUT ROWID;
CREATE TABLE host_rollup_d (
    bucket_s BIGINT NOT NULL, host TEXT NOT NULL, datacenter TEXT NOT NULL,
    host_s DOUBLE PRECISION NOT NULL, energy_j DOUBLE PRECISION NOT NULL,
    idle_energy_j DOUBLE PRECISION NOT NULL, estimated_energy_j DOUBLE PRECISION NOT NULL,
    carbon_g DOUBLE PRECISION NOT NULL, embodied_g DOUBLE PRECISION NOT NULL,
    busy_cpu_ns DOUBLE PRECISION NOT NULL, idle_cpu_ns DOUBLE PRECISION NOT NULL,
    transactions DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (bucket_s, host, datacenter)) WITHOUT ROWID;
CREATE TABLE service_rollup_d (
    bucket_s BIGINT NOT NULL, datacenter TEXT NOT NULL, service TEXT NOT NULL, scenario TEXT NOT NULL,
    cpu_ns DOUBLE PRECISION NOT NULL, energy_j DOUBLE PRECISION NOT NULL,
    idle_energy_j DOUBLE PRECISION NOT NULL, carbon_g DOUBLE PRECISION NOT NULL,
    embodied_g DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (bucket_s, datacenter, service, scenario)) WITHOUT ROWID;
CREATE TABLE profile_rollup_d (
    bucket_s BIGINT NOT NULL, service TEXT NOT NULL, scenario TEXT NOT NULL, stack TEXT NOT NULL,
    samples DOUBLE PRECISION NOT NULL, energy_j DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (bucket_s, service, scenario, stack)) WITHOUT ROWID;
