//! The NBD wire protocol (fixed newstyle handshake, simple replies), as pure functions over
//! bytes so that the parsers can be fuzzed without sockets. Reference: the NBD protocol
//! document (github.com/NetworkBlockDevice/nbd, doc/proto.md); summary in
//! kernel-notes/nbd.md. All integers are big-endian on the wire.

pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943; // "NBDMAGIC"
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054; // "IHAVEOPT"
pub const REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;

// Handshake flags (server) and client flags.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
pub const CLIENT_FIXED_NEWSTYLE: u32 = 1 << 0;
pub const CLIENT_NO_ZEROES: u32 = 1 << 1;

// Options.
pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_ABORT: u32 = 2;
pub const OPT_LIST: u32 = 3;
pub const OPT_INFO: u32 = 6;
pub const OPT_GO: u32 = 7;

// Option replies.
pub const REP_ACK: u32 = 1;
pub const REP_SERVER: u32 = 2;
pub const REP_INFO: u32 = 3;
pub const REP_ERR_UNSUP: u32 = 0x8000_0001;
pub const REP_ERR_INVALID: u32 = 0x8000_0003;
pub const REP_ERR_UNKNOWN: u32 = 0x8000_0006;

// Info types.
pub const INFO_EXPORT: u16 = 0;
pub const INFO_BLOCK_SIZE: u16 = 3;

// Transmission flags.
pub const TFLAG_HAS_FLAGS: u16 = 1 << 0;
pub const TFLAG_SEND_FLUSH: u16 = 1 << 2;
pub const TFLAG_SEND_FUA: u16 = 1 << 3;
pub const TFLAG_SEND_TRIM: u16 = 1 << 5;
pub const TFLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
pub const TFLAG_CAN_MULTI_CONN: u16 = 1 << 8;
pub const TFLAG_SEND_CACHE: u16 = 1 << 10;

// Commands and command flags.
pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_CACHE: u16 = 5;
pub const CMD_WRITE_ZEROES: u16 = 6;
pub const CMD_FLAG_FUA: u16 = 1 << 0;
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;

// Errors in replies.
pub const EIO: u32 = 5;
pub const EINVAL: u32 = 22;
pub const ENOSPC: u32 = 28;

/// Largest request payload we accept (the protocol's customary maximum).
pub const MAX_PAYLOAD: u32 = 32 << 20;
/// Largest option payload we accept during the handshake.
pub const MAX_OPTION_LEN: u32 = 64 << 10;

pub const REQUEST_LEN: usize = 28;

/// A problem that ends the connection (the protocol has no way to report it per request).
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum ProtoError {
    #[error("bad magic {0:#x}")]
    BadMagic(u64),
    #[error("client does not speak fixed newstyle (flags {0:#x})")]
    NotFixedNewstyle(u32),
    #[error("option length {0} exceeds {MAX_OPTION_LEN}")]
    OptionTooLong(u32),
    #[error("write payload {0} exceeds {MAX_PAYLOAD}")]
    PayloadTooLong(u32),
    #[error("malformed option data")]
    MalformedOption,
}

/// The server's first 18 bytes.
pub fn server_greeting() -> [u8; 18] {
    let mut b = [0u8; 18];
    b[0..8].copy_from_slice(&NBDMAGIC.to_be_bytes());
    b[8..16].copy_from_slice(&IHAVEOPT.to_be_bytes());
    b[16..18].copy_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    b
}

/// The client's flags: fixed newstyle is required (we never speak old-style).
pub fn parse_client_flags(b: [u8; 4]) -> Result<u32, ProtoError> {
    let flags = u32::from_be_bytes(b);
    if flags & CLIENT_FIXED_NEWSTYLE == 0
        || flags & !(CLIENT_FIXED_NEWSTYLE | CLIENT_NO_ZEROES) != 0
    {
        return Err(ProtoError::NotFixedNewstyle(flags));
    }
    Ok(flags)
}

/// An option header: magic, option, length (16 bytes).
pub fn parse_option_header(b: [u8; 16]) -> Result<(u32, u32), ProtoError> {
    let magic = u64::from_be_bytes(b[0..8].try_into().expect("8 bytes"));
    if magic != IHAVEOPT {
        return Err(ProtoError::BadMagic(magic));
    }
    let option = u32::from_be_bytes(b[8..12].try_into().expect("4 bytes"));
    let len = u32::from_be_bytes(b[12..16].try_into().expect("4 bytes"));
    if len > MAX_OPTION_LEN {
        return Err(ProtoError::OptionTooLong(len));
    }
    Ok((option, len))
}

/// NBD_OPT_INFO / NBD_OPT_GO data: export name and the info types the client asks for.
pub fn parse_info_request(data: &[u8]) -> Result<(String, Vec<u16>), ProtoError> {
    let name_len = data.get(0..4).ok_or(ProtoError::MalformedOption)?;
    let name_len = u32::from_be_bytes(name_len.try_into().expect("4 bytes")) as usize;
    let name = data
        .get(
            4..4usize
                .checked_add(name_len)
                .ok_or(ProtoError::MalformedOption)?,
        )
        .ok_or(ProtoError::MalformedOption)?;
    let rest = &data[4 + name_len..];
    let count = rest.get(0..2).ok_or(ProtoError::MalformedOption)?;
    let count = u16::from_be_bytes(count.try_into().expect("2 bytes")) as usize;
    let list = &rest[2..];
    if list.len() != count * 2 {
        return Err(ProtoError::MalformedOption);
    }
    let infos = list
        .chunks_exact(2)
        .map(|c| u16::from_be_bytes([c[0], c[1]]))
        .collect();
    let name = String::from_utf8(name.to_vec()).map_err(|_| ProtoError::MalformedOption)?;
    Ok((name, infos))
}

/// An option reply: magic, option, type, length, data.
pub fn option_reply(option: u32, reply: u32, data: &[u8]) -> Vec<u8> {
    let mut b = Vec::with_capacity(20 + data.len());
    b.extend_from_slice(&REPLY_MAGIC.to_be_bytes());
    b.extend_from_slice(&option.to_be_bytes());
    b.extend_from_slice(&reply.to_be_bytes());
    b.extend_from_slice(&(data.len() as u32).to_be_bytes());
    b.extend_from_slice(data);
    b
}

pub fn info_export(size: u64, flags: u16) -> Vec<u8> {
    let mut b = Vec::with_capacity(12);
    b.extend_from_slice(&INFO_EXPORT.to_be_bytes());
    b.extend_from_slice(&size.to_be_bytes());
    b.extend_from_slice(&flags.to_be_bytes());
    b
}

pub fn info_block_size(min: u32, preferred: u32, max: u32) -> Vec<u8> {
    let mut b = Vec::with_capacity(14);
    b.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
    b.extend_from_slice(&min.to_be_bytes());
    b.extend_from_slice(&preferred.to_be_bytes());
    b.extend_from_slice(&max.to_be_bytes());
    b
}

/// NBD_REP_SERVER data for NBD_OPT_LIST.
pub fn list_entry(name: &str) -> Vec<u8> {
    let mut b = Vec::with_capacity(4 + name.len());
    b.extend_from_slice(&(name.len() as u32).to_be_bytes());
    b.extend_from_slice(name.as_bytes());
    b
}

/// The reply to NBD_OPT_EXPORT_NAME: size, flags, and 124 zero bytes unless NO_ZEROES.
pub fn export_name_reply(size: u64, flags: u16, no_zeroes: bool) -> Vec<u8> {
    let mut b = Vec::with_capacity(134);
    b.extend_from_slice(&size.to_be_bytes());
    b.extend_from_slice(&flags.to_be_bytes());
    if !no_zeroes {
        b.extend_from_slice(&[0u8; 124]);
    }
    b
}

/// A transmission request header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    pub flags: u16,
    pub command: u16,
    pub cookie: u64,
    pub offset: u64,
    pub length: u32,
}

impl Request {
    /// Bytes of payload that follow this header on the wire.
    pub fn payload_len(&self) -> u32 {
        if self.command == CMD_WRITE {
            self.length
        } else {
            0
        }
    }
}

/// Parses a request header. A bad magic or an oversized write payload ends the connection
/// (the payload cannot be skipped safely); other problems are answered per request.
pub fn parse_request(b: &[u8; REQUEST_LEN]) -> Result<Request, ProtoError> {
    let magic = u32::from_be_bytes(b[0..4].try_into().expect("4 bytes"));
    if magic != REQUEST_MAGIC {
        return Err(ProtoError::BadMagic(magic as u64));
    }
    let req = Request {
        flags: u16::from_be_bytes([b[4], b[5]]),
        command: u16::from_be_bytes([b[6], b[7]]),
        cookie: u64::from_be_bytes(b[8..16].try_into().expect("8 bytes")),
        offset: u64::from_be_bytes(b[16..24].try_into().expect("8 bytes")),
        length: u32::from_be_bytes(b[24..28].try_into().expect("4 bytes")),
    };
    if req.command == CMD_WRITE && req.length > MAX_PAYLOAD {
        return Err(ProtoError::PayloadTooLong(req.length));
    }
    Ok(req)
}

/// A simple reply header (16 bytes); read data follows on success.
pub fn simple_reply(error: u32, cookie: u64) -> [u8; 16] {
    let mut b = [0u8; 16];
    b[0..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    b[4..8].copy_from_slice(&error.to_be_bytes());
    b[8..16].copy_from_slice(&cookie.to_be_bytes());
    b
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn request_bytes(flags: u16, cmd: u16, cookie: u64, off: u64, len: u32) -> [u8; REQUEST_LEN] {
        let mut b = [0u8; REQUEST_LEN];
        b[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        b[4..6].copy_from_slice(&flags.to_be_bytes());
        b[6..8].copy_from_slice(&cmd.to_be_bytes());
        b[8..16].copy_from_slice(&cookie.to_be_bytes());
        b[16..24].copy_from_slice(&off.to_be_bytes());
        b[24..28].copy_from_slice(&len.to_be_bytes());
        b
    }

    #[test]
    fn request_roundtrip_and_limits() {
        let r = parse_request(&request_bytes(1, CMD_WRITE, 7, 4096, 512)).unwrap();
        assert_eq!(
            r,
            Request {
                flags: 1,
                command: CMD_WRITE,
                cookie: 7,
                offset: 4096,
                length: 512
            }
        );
        assert_eq!(r.payload_len(), 512);
        assert_eq!(
            parse_request(&request_bytes(0, CMD_WRITE, 1, 0, MAX_PAYLOAD + 1)),
            Err(ProtoError::PayloadTooLong(MAX_PAYLOAD + 1))
        );
        // An oversized read is answered with an error, not a disconnect.
        assert!(parse_request(&request_bytes(0, CMD_READ, 1, 0, u32::MAX)).is_ok());
        let mut bad = request_bytes(0, CMD_READ, 1, 0, 1);
        bad[0] ^= 1;
        assert!(matches!(parse_request(&bad), Err(ProtoError::BadMagic(_))));
    }

    #[test]
    fn info_request_parsing() {
        let mut d = Vec::new();
        d.extend_from_slice(&3u32.to_be_bytes());
        d.extend_from_slice(b"vm1");
        d.extend_from_slice(&2u16.to_be_bytes());
        d.extend_from_slice(&INFO_EXPORT.to_be_bytes());
        d.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
        assert_eq!(
            parse_info_request(&d).unwrap(),
            ("vm1".to_string(), vec![0, 3])
        );
        assert!(parse_info_request(&d[..d.len() - 1]).is_err());
        assert!(parse_info_request(&[0, 0, 0, 9, b'a']).is_err());
        assert!(parse_info_request(&[0xff, 0xff, 0xff, 0xff]).is_err());
    }

    #[test]
    fn client_flags() {
        assert_eq!(parse_client_flags(3u32.to_be_bytes()), Ok(3));
        assert!(parse_client_flags(0u32.to_be_bytes()).is_err());
        assert!(parse_client_flags(0x101u32.to_be_bytes()).is_err());
    }

    proptest! {
        #[test]
        fn parsers_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = parse_info_request(&bytes);
            if bytes.len() >= REQUEST_LEN {
                let _ = parse_request(bytes[..REQUEST_LEN].try_into().unwrap());
            }
            if bytes.len() >= 16 {
                let _ = parse_option_header(bytes[..16].try_into().unwrap());
            }
            if bytes.len() >= 4 {
                let _ = parse_client_flags(bytes[..4].try_into().unwrap());
            }
        }
    }
}
