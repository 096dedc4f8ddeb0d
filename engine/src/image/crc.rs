//! Combining page checksums: the CRC32C of consecutive pages from each
//! page's own, without reading the pages again. A CRC is linear over GF(2):
//! `crc(A ‖ B)` is `crc(B)` XOR the CRC register of `A` run through a page
//! of zero bytes, and running a register through a page of zeros is a fixed
//! linear map, done with four byte-wise table lookups. The dump's page
//! checksums made inside the target (raw, per page) and those kept over the
//! rounds of a pre-copy (finished, per page) both become chunk checksums
//! this way, the same as checksumming the chunk's bytes.

use std::sync::OnceLock;

/// The page size the tables are built for.
const PAGE: usize = crate::sys::PAGE_SIZE as usize;

/// Tables of the map taking a raw CRC state past a page of zero bytes, one
/// per byte of the state (the map is linear, so the four results XOR).
fn shift_tables() -> &'static [[u32; 256]; 4] {
    static TABLES: OnceLock<Box<[[u32; 256]; 4]>> = OnceLock::new();
    TABLES.get_or_init(|| {
        let zeros = [0u8; PAGE];
        // crc32c_append inverts the state before and after: undo both.
        let shift = |state: u32| !crc32c::crc32c_append(!state, &zeros);
        let basis: Vec<u32> = (0..32).map(|bit| shift(1 << bit)).collect();
        let mut t = Box::new([[0u32; 256]; 4]);
        for (byte, table) in t.iter_mut().enumerate() {
            for (v, slot) in table.iter_mut().enumerate() {
                *slot = (0..8)
                    .filter(|b| v & (1 << b) != 0)
                    .fold(0, |acc, b| acc ^ basis[byte * 8 + b]);
            }
        }
        t
    })
}

/// A raw CRC register run through one page of zero bytes.
fn past_a_page(state: u32) -> u32 {
    let t = shift_tables();
    let s = state.to_le_bytes();
    t[0][s[0] as usize] ^ t[1][s[1] as usize] ^ t[2][s[2] as usize] ^ t[3][s[3] as usize]
}

/// The CRC32C of consecutive pages from each page's raw CRC (CRC32C from a
/// zero state, without the final inversion).
pub fn of_raw_pages(raw: impl IntoIterator<Item = u32>) -> u32 {
    !raw.into_iter()
        .fold(u32::MAX, |state, crc| past_a_page(state) ^ crc)
}

/// The CRC32C of consecutive pages from each page's CRC32C:
/// `crc(A ‖ B) = Z(crc(A)) ^ crc(B)`, `Z` the register run through a page of
/// zeros.
pub fn of_pages(crcs: &[u32]) -> u32 {
    let mut iter = crcs.iter();
    let Some(&first) = iter.next() else {
        return crc32c::crc32c(&[]);
    };
    iter.fold(first, |acc, &c| past_a_page(acc) ^ c)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pages(n: usize) -> Vec<u8> {
        (0..n * PAGE).map(|i| (i * 7 + i / 4096) as u8).collect()
    }

    #[rstest::rstest]
    #[case(1)]
    #[case(2)]
    #[case(7)]
    fn page_crcs_combine_to_the_crc_of_their_bytes(#[case] n: usize) {
        let data = pages(n);
        let crcs: Vec<u32> = data.chunks(PAGE).map(crc32c::crc32c).collect();
        assert_eq!(of_pages(&crcs), crc32c::crc32c(&data));
        // Raw: from a zero state, no final inversion.
        let raw: Vec<u32> = data
            .chunks(PAGE)
            .map(|p| !crc32c::crc32c_append(!0, p))
            .collect();
        assert_eq!(of_raw_pages(raw), crc32c::crc32c(&data));
    }
}
