//! Run ids and store tokens.
use std::io::Read;

/// `bytes` random bytes as lowercase hex, from the kernel's CSPRNG.
pub fn random_hex(bytes: usize) -> std::io::Result<String> {
    let mut buf = vec![0u8; bytes];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut buf)?;
    Ok(buf.iter().map(|b| format!("{b:02x}")).collect())
}

#[cfg(test)]
mod tests {
    #[test]
    fn hex_tokens_differ() {
        let a = super::random_hex(16).unwrap();
        assert_eq!(a.len(), 32);
        assert_ne!(a, super::random_hex(16).unwrap());
    }
}
