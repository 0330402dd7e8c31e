//! cargo fuzz target; the checks live in src/lib.rs (see there).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| pmemvm_fuzz::pmem_options(data));
