//! On-disk spool of windows awaiting the aggregator's acknowledgement.
