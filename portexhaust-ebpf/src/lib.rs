#![no_std]
//! Empty library target: lets `portexhaust` declare this crate as a build-dependency so cargo
//! rebuilds the embedded object when the programs change.
