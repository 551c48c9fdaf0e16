//! An NBD transmission-phase request header from a client: any 28 bytes parse or are refused.
#![no_main]

use libfuzzer_sys::fuzz_target;
use stasis::frontend::nbd::proto;

fuzz_target!(|data: &[u8]| {
    if let Ok(header) = <&[u8; proto::REQUEST_LEN]>::try_from(data) {
        if let Ok(req) = proto::parse_request(header) {
            let _ = req.payload_len();
        }
    }
});
