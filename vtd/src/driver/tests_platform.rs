//! Tests of one driver over several units.
