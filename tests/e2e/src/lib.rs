//! End-to-end tests of dmar: real servers and real agents on loopback, exercised together.
//! The tests are in `tests/`; this library is empty.
