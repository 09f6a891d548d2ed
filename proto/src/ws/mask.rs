//! Client-to-server payload masking (RFC 6455 §5.3).
//!
//! `apply_mask` is the fast path (eight bytes per step); `apply_mask_bytewise` is its safe twin,
//! and a differential test keeps them equal.
#![allow(clippy::host_endian_bytes)]

/// Unmasks (or masks) `buf` in place with the 4-byte `mask`, starting at mask phase 0.
pub fn apply_mask(buf: &mut [u8], mask: [u8; 4]) {
    // The mask repeated to 8 bytes; XOR of native-endian words equals bytewise XOR because the
    // same byte order is used to load and to store.
    let word = u64::from_ne_bytes([
        mask[0], mask[1], mask[2], mask[3], mask[0], mask[1], mask[2], mask[3],
    ]);
    let mut chunks = buf.chunks_exact_mut(8);
    for chunk in &mut chunks {
        let v = u64::from_ne_bytes(chunk.try_into().expect("chunks_exact gives 8 bytes")) ^ word;
        chunk.copy_from_slice(&v.to_ne_bytes());
    }
    for (i, b) in chunks.into_remainder().iter_mut().enumerate() {
        *b ^= mask[i & 3];
    }
}

/// The reference implementation: one byte at a time.
pub fn apply_mask_bytewise(buf: &mut [u8], mask: [u8; 4]) {
    for (i, b) in buf.iter_mut().enumerate() {
        *b ^= mask[i & 3];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fast_equals_bytewise() {
        let mask = [0x6d, 0xb6, 0xb2, 0x80];
        for len in 0..70 {
            let data: Vec<u8> = (0..len).map(|i| (i * 7 + 3) as u8).collect();
            let (mut a, mut b) = (data.clone(), data.clone());
            apply_mask(&mut a, mask);
            apply_mask_bytewise(&mut b, mask);
            assert_eq!(a, b, "len {len}");
            apply_mask(&mut a, mask);
            assert_eq!(a, data);
        }
    }
}
