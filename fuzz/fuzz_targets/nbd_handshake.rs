//! The handshake pieces a client sends: client flags, option headers, NBD_OPT_INFO/GO data.
#![no_main]

use libfuzzer_sys::fuzz_target;
use stasis::frontend::nbd::proto;

fuzz_target!(|data: &[u8]| {
    if data.len() >= 4 {
        let _ = proto::parse_client_flags(data[..4].try_into().unwrap());
    }
    if data.len() >= 16 {
        let _ = proto::parse_option_header(data[..16].try_into().unwrap());
    }
    let _ = proto::parse_info_request(data);
});
