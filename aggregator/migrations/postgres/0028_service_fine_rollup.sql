-- Service sums per rollup_step (issue 24: service-scope reviews shorter than
-- a host step). Kept as long as raw windows (raw_retention); what is older
-- exists per host step only (service_rollup). On a database that already
-- holds service rollups, this table starts after their last host step:
-- meta service_rollup_m_from_s (retention moves it forward).
CREATE TABLE service_rollup_m (
    bucket_s BIGINT NOT NULL, datacenter TEXT NOT NULL, service TEXT NOT NULL, scenario TEXT NOT NULL,
    cpu_ns DOUBLE PRECISION NOT NULL, energy_j DOUBLE PRECISION NOT NULL,
    idle_energy_j DOUBLE PRECISION NOT NULL, carbon_g DOUBLE PRECISION NOT NULL,
    embodied_g DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (bucket_s, datacenter, service, scenario));
INSERT INTO meta (key, value)
SELECT 'service_rollup_m_from_s', CAST(MAX(s.bucket_s) + CAST(m.value AS BIGINT) AS TEXT)
FROM service_rollup s, meta m
WHERE m.key = 'host_rollup_step_s'
GROUP BY m.value;
