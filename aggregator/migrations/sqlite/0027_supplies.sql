-- sci-aggregator schema 27 (sqlite): resource supplies and plans (#27,
-- standard 7.2 and 7.4). A supply is what a host is (CPU model and vendor,
-- architecture, logical CPUs, memory, bare metal or VM, the physical
-- machine's CPUs, operator labels), keyed by its canonical text.
-- supply_rollup: per host step, data centre and supply, the hosts' time,
-- nominal CPU capacity, busy CPU, energy, carbon and the factors behind it;
-- supply_service_rollup: per host step, each service's share of it per
-- scenario with the transactions it served; supply_attrs: each supply's
-- attributes (one row per attribute, labels as 'label.<key>'), which
-- grouping by any attribute joins. plans: every plan sci-cf made, with its
-- prediction, for the check afterwards.
CREATE TABLE supply_rollup (
    bucket_s BIGINT NOT NULL, datacenter TEXT NOT NULL, supply TEXT NOT NULL,
    host_s DOUBLE PRECISION NOT NULL, capacity_cpu_ns DOUBLE PRECISION NOT NULL,
    busy_cpu_ns DOUBLE PRECISION NOT NULL, energy_j DOUBLE PRECISION NOT NULL,
    operational_g DOUBLE PRECISION NOT NULL, embodied_g DOUBLE PRECISION NOT NULL,
    intensity_x_s DOUBLE PRECISION NOT NULL, pue_x_s DOUBLE PRECISION NOT NULL,
    transactions DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (bucket_s, datacenter, supply)) WITHOUT ROWID;
CREATE TABLE supply_service_rollup (
    bucket_s BIGINT NOT NULL, datacenter TEXT NOT NULL, supply TEXT NOT NULL,
    service TEXT NOT NULL, scenario TEXT NOT NULL,
    cpu_ns DOUBLE PRECISION NOT NULL, energy_j DOUBLE PRECISION NOT NULL,
    idle_energy_j DOUBLE PRECISION NOT NULL, carbon_g DOUBLE PRECISION NOT NULL,
    embodied_g DOUBLE PRECISION NOT NULL, transactions DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (bucket_s, datacenter, supply, service, scenario)) WITHOUT ROWID;
CREATE TABLE supply_attrs (
    supply TEXT NOT NULL, attr TEXT NOT NULL, value TEXT NOT NULL,
    PRIMARY KEY (supply, attr)) WITHOUT ROWID;
CREATE TABLE plans (
    id TEXT PRIMARY KEY, created_unix_s BIGINT NOT NULL, kind TEXT NOT NULL,
    service TEXT NOT NULL, carried_out_unix_s BIGINT, body TEXT NOT NULL) WITHOUT ROWID;
