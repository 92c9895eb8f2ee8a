//! The Internet checksum (RFC 1071): ones'-complement sums of 16-bit words,
//! as IPv4, ICMP, TCP and UDP carry them.

/// RFC 1624 incremental update of a checksum for one 16-bit word changing
/// from `old` to `new` (all values as read big-endian).
#[inline(always)]
pub fn csum_replace16(check: u16, old: u16, new: u16) -> u16 {
    let mut sum: u32 = (!check) as u32 + (!old) as u32 + new as u32;
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}

/// The checksum of the `len` bytes of `bytes` from `start` (an even
/// number of them; none past its end are read).
#[inline(always)]
pub fn checksum_of<const N: usize>(bytes: &[u8; N], start: usize, len: usize) -> u16 {
    let mut sum: u32 = 0;
    let mut i = 0;
    while i < len {
        let at = start + i;
        if at + 1 < N {
            sum += u16::from_be_bytes([bytes[at], bytes[at + 1]]) as u32;
        }
        i += 2;
    }
    fold(sum)
}

/// The checksum of a sum of 16-bit words: its carries folded back in
/// (twice: the first fold may carry again), complemented.
#[inline(always)]
fn fold(mut sum: u32) -> u16 {
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}

/// `ip_fast_csum`: does an option-less IPv4 header, as its five 32-bit
/// words read in native order, verify? Its ones'-complement sum, checksum
/// included, is 0xffff. Summing native-order words gives the byte-swapped
/// sum, and 0xffff is its own swap.
#[inline(always)]
pub fn ipv4_header_verifies(words: [u32; 5]) -> bool {
    let w = words;
    let mut sum = w[0] as u64 + w[1] as u64 + w[2] as u64 + w[3] as u64 + w[4] as u64;
    sum = (sum & 0xffff_ffff) + (sum >> 32);
    sum = (sum & 0xffff_ffff) + (sum >> 32);
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum == 0xffff
}
