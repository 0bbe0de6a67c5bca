//! dmar-loadgen: scenario setup and translation-scaling measurements.
