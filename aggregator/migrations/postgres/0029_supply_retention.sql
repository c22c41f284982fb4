-- sci-aggregator schema 29: retention of supply_attrs (#27). A supply's
-- attributes are kept while any supply_rollup row names it; this index lets
-- the hourly expiry find supplies no row names without scanning the rollup.
CREATE INDEX supply_rollup_supply ON supply_rollup (supply);
