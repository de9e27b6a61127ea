//! A process under our control.
#![deny(unsafe_code)]
