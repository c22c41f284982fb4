-- sci-aggregator schema 30 (sqlite): the daily copy of the supply rollups
-- (#27), written at ingest beside the host-step ones like host_rollup_d and
-- service_rollup_d, so that a long supply query reads whole days and only
-- its edges by host step. Filled here from the host-step rows already
-- stored (host_rollup_step divides a day, so the sums are exact).
CREATE TABLE supply_rollup_d (
    bucket_s BIGINT NOT NULL, datacenter TEXT NOT NULL, supply TEXT NOT NULL,
    host_s DOUBLE PRECISION NOT NULL, capacity_cpu_ns DOUBLE PRECISION NOT NULL,
    busy_cpu_ns DOUBLE PRECISION NOT NULL, energy_j DOUBLE PRECISION NOT NULL,
    operational_g DOUBLE PRECISION NOT NULL, embodied_g DOUBLE PRECISION NOT NULL,
    intensity_x_s DOUBLE PRECISION NOT NULL, pue_x_s DOUBLE PRECISION NOT NULL,
    transactions DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (bucket_s, datacenter, supply)) WITHOUT ROWID;
CREATE TABLE supply_service_rollup_d (
    bucket_s BIGINT NOT NULL, datacenter TEXT NOT NULL, supply TEXT NOT NULL,
    service TEXT NOT NULL, scenario TEXT NOT NULL,
    cpu_ns DOUBLE PRECISION NOT NULL, energy_j DOUBLE PRECISION NOT NULL,
    idle_energy_j DOUBLE PRECISION NOT NULL, carbon_g DOUBLE PRECISION NOT NULL,
    embodied_g DOUBLE PRECISION NOT NULL, transactions DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (bucket_s, datacenter, supply, service, scenario)) WITHOUT ROWID;
INSERT INTO supply_rollup_d
    SELECT bucket_s / 86400 * 86400, datacenter, supply, SUM(host_s), SUM(capacity_cpu_ns),
        SUM(busy_cpu_ns), SUM(energy_j), SUM(operational_g), SUM(embodied_g),
        SUM(intensity_x_s), SUM(pue_x_s), SUM(transactions)
    FROM supply_rollup GROUP BY bucket_s / 86400 * 86400, datacenter, supply;
INSERT INTO supply_service_rollup_d
    SELECT bucket_s / 86400 * 86400, datacenter, supply, service, scenario, SUM(cpu_ns),
        SUM(energy_j), SUM(idle_energy_j), SUM(carbon_g), SUM(embodied_g), SUM(transactions)
    FROM supply_service_rollup GROUP BY bucket_s / 86400 * 86400, datacenter, supply, service, scenario;
