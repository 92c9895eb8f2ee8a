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

/// The checksum of `bytes` (an even number of them), to be written into a
/// header whose checksum field is zero in `bytes`.
#[inline(always)]
pub fn checksum<const N: usize>(bytes: &[u8; N]) -> u16 {
    const { assert!(N.is_multiple_of(2)) };
    checksum_of(bytes, 0, N)
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

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A small deterministic generator (xorshift64*) for the randomised
    /// tests: the same headers on every run, no dependency.
    pub(crate) struct Random(u64);

    impl Random {
        pub(crate) fn new(seed: u64) -> Random {
            Random(seed | 1)
        }

        pub(crate) fn next_u64(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }

        pub(crate) fn below(&mut self, n: usize) -> usize {
            (self.next_u64() % n as u64) as usize
        }

        pub(crate) fn fill(&mut self, bytes: &mut [u8]) {
            for byte in bytes {
                *byte = self.next_u64() as u8;
            }
        }

        /// A random option-less IPv4 header with a right checksum.
        pub(crate) fn ipv4_header(&mut self) -> [u8; 20] {
            let mut header = [0u8; 20];
            self.fill(&mut header);
            header[0] = 0x45;
            header[10..12].copy_from_slice(&[0, 0]);
            let check = checksum(&header);
            header[10..12].copy_from_slice(&check.to_be_bytes());
            header
        }
    }

    /// RFC 1071 section 3's example: words 0001 f203 f4f5 f6f7 sum to
    /// 2ddf0, ddf2 once the carry is folded in; the checksum is its
    /// complement. Data with its checksum appended sums to zero.
    #[test]
    fn checksum_of_the_rfc_1071_example() {
        let data = [0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7];
        assert_eq!(checksum(&data), 0x220d);
        let mut with_checksum = [0u8; 10];
        with_checksum[..8].copy_from_slice(&data);
        with_checksum[8..].copy_from_slice(&0x220du16.to_be_bytes());
        assert_eq!(checksum(&with_checksum), 0);
        assert_eq!(checksum(&[0u8; 4]), 0xffff);
    }

    /// A range of a larger frame sums as the same bytes alone, and nothing
    /// past the frame's end is read.
    #[test]
    fn a_range_sums_as_its_bytes_alone() {
        let mut random = Random::new(0xf4a3e);
        for _ in 0..1_000 {
            let mut frame = [0u8; 70];
            random.fill(&mut frame);
            let header: [u8; 20] = frame[14..34].try_into().unwrap();
            assert_eq!(checksum_of(&frame, 14, 20), checksum(&header));
            let message: [u8; 36] = frame[34..70].try_into().unwrap();
            assert_eq!(checksum_of(&frame, 34, 36), checksum(&message));
            let tail: [u8; 2] = frame[68..70].try_into().unwrap();
            assert_eq!(checksum_of(&frame, 68, 8), checksum(&tail));
        }
    }

    /// RFC 1624 section 4's example, where the update of RFC 1141 gives
    /// 0xffff: a header checksum of 0xdd2f, a word changing from 0x5555 to
    /// 0x3285, must become 0x0000.
    #[test]
    fn incremental_update_of_the_rfc_1624_example() {
        assert_eq!(csum_replace16(0xdd2f, 0x5555, 0x3285), 0x0000);
        // Nothing changes: nor does the checksum.
        assert_eq!(csum_replace16(0x1234, 0xabcd, 0xabcd), 0x1234);
    }

    /// A real header (from a capture), checksum 0xb861.
    const HEADER: [u8; 20] = [
        0x45, 0x00, 0x00, 0x73, 0x00, 0x00, 0x40, 0x00, 0x40, 0x11, 0xb8, 0x61, 0xc0, 0xa8, 0x00, 0x01, 0xc0,
        0xa8, 0x00, 0xc7,
    ];

    fn words(header: &[u8; 20]) -> [u32; 5] {
        core::array::from_fn(|i| u32::from_ne_bytes(header[i * 4..i * 4 + 4].try_into().unwrap()))
    }

    #[test]
    fn header_checksum_is_made_and_verified() {
        let mut header = HEADER;
        header[10..12].copy_from_slice(&[0, 0]);
        assert_eq!(checksum(&header), 0xb861);
        assert!(ipv4_header_verifies(words(&HEADER)));
        for byte in 0..20 {
            let mut broken = HEADER;
            broken[byte] ^= 0x10;
            assert!(!ipv4_header_verifies(words(&broken)), "byte {byte} changed");
        }
    }

    /// The carries that random data almost never makes: an update whose
    /// sum carries twice, and a header whose 32-bit word sum is all ones
    /// (folded once it is 0x1fffe, twice the right 0xffff).
    #[test]
    fn end_around_carries_are_folded_in_to_the_end() {
        // Sums to 0xffff, so its checksum is 0x0000; the id 0 -> 1 then
        // takes the sum to 0x10000, 0x0001 folded: checksum 0xfffe.
        let mut header = [0u8; 20];
        header[..4].copy_from_slice(&[0x45, 0x00, 0xba, 0xff]);
        assert_eq!(checksum(&header), 0x0000);
        header[5] = 1;
        assert_eq!(checksum(&header), 0xfffe);
        assert_eq!(csum_replace16(0x0000, 0x0000, 0x0001), 0xfffe);

        let mut all_ones = [0u8; 20];
        all_ones[0] = 0x45;
        all_ones[16..].copy_from_slice(&[0xba, 0xff, 0xff, 0xff]);
        assert_eq!(words(&all_ones).iter().map(|&w| w as u64).sum::<u64>(), 0xffff_ffff);
        assert_eq!(checksum(&all_ones), 0, "a right header");
        assert!(ipv4_header_verifies(words(&all_ones)));
    }

    /// Any word of a random header but the checksum itself changed to a
    /// random value: the incremental update gives what a full sum does.
    #[test]
    fn incremental_update_matches_a_full_sum_on_random_headers() {
        let mut random = Random::new(0x5eed_1071);
        for _ in 0..100_000 {
            let mut header = random.ipv4_header();
            let before = u16::from_be_bytes([header[10], header[11]]);
            let word = [0, 1, 2, 3, 4, 6, 7, 8, 9][random.below(9)];
            let old = u16::from_be_bytes([header[word * 2], header[word * 2 + 1]]);
            let new = random.next_u64() as u16;
            header[word * 2..word * 2 + 2].copy_from_slice(&new.to_be_bytes());
            header[10..12].copy_from_slice(&[0, 0]);
            let full = checksum(&header);
            assert_eq!(csum_replace16(before, old, new), full, "word {word}: {old:#06x} -> {new:#06x}");
        }
    }

    /// On random headers the fast check agrees with the full sum: a right
    /// checksum verifies, and any single bit flipped anywhere is caught.
    #[test]
    fn verification_catches_every_single_bit_error_on_random_headers() {
        let mut random = Random::new(0xc0ff_ee00);
        for _ in 0..10_000 {
            let header = random.ipv4_header();
            assert_eq!(checksum(&header), 0);
            assert!(ipv4_header_verifies(words(&header)), "{header:02x?}");
            let bit = random.below(160);
            let mut broken = header;
            broken[bit / 8] ^= 1 << (bit % 8);
            assert!(!ipv4_header_verifies(words(&broken)), "bit {bit} of {header:02x?}");
        }
    }

    #[test]
    fn incremental_update_matches_a_full_sum() {
        // The TTL/protocol word, as a router decrements the TTL.
        for ttl in 1..=255u8 {
            let mut header = HEADER;
            header[8] = ttl;
            header[10..12].copy_from_slice(&[0, 0]);
            let before = checksum(&header);
            header[8] = ttl - 1;
            let after = checksum(&header);
            let old = u16::from_be_bytes([ttl, 0x11]);
            let new = u16::from_be_bytes([ttl - 1, 0x11]);
            assert_eq!(csum_replace16(before, old, new), after, "ttl {ttl}");
        }
    }
}
