//! A manifest from the repository: any bytes decode to a consistent manifest or an error.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(m) = stasis::repo::Manifest::decode(data) {
        assert!(m.entries.windows(2).all(|w| w[0].0 < w[1].0));
    }
});
