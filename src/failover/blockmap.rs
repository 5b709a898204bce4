//! Which 4 KiB blocks a drill clone wrote (its overlay holds them).

use std::collections::HashMap;

/// Blocks per page of the map (a page covers 16 MiB of 4 KiB blocks).
const PAGE_BLOCKS: u64 = 4096;

/// Which 4 KiB blocks the drill wrote: pages allocated on first write, a
/// page written whole kept as one marker (a discard of the whole device,
/// as mkfs does, costs a few bytes per 16 MiB).
#[derive(Default)]
pub struct BlockMap {
    pages: HashMap<u64, Page>,
    /// Blocks marked written.
    blocks: u64,
}

enum Page {
    Full,
    Bits(Box<[u64; (PAGE_BLOCKS / 64) as usize]>),
}

impl BlockMap {
    pub fn get(&self, block: u64) -> bool {
        match self.pages.get(&(block / PAGE_BLOCKS)) {
            None => false,
            Some(Page::Full) => true,
            Some(Page::Bits(b)) => {
                let i = block % PAGE_BLOCKS;
                b[(i / 64) as usize] & (1 << (i % 64)) != 0
            }
        }
    }

    /// The first block of `[block, end)` whose state differs from
    /// `block`'s (`end` when none): a page that is all one state in one
    /// step, a page of bits a word at a time.
    pub fn run_end(&self, block: u64, end: u64) -> u64 {
        let state = self.get(block);
        let mut b = block;
        while b < end {
            let page = b / PAGE_BLOCKS;
            let page_end = ((page + 1) * PAGE_BLOCKS).min(end);
            match self.pages.get(&page) {
                None if !state => b = page_end,
                Some(Page::Full) if state => b = page_end,
                None | Some(Page::Full) => return b,
                Some(Page::Bits(bits)) => {
                    // Words never straddle pages (a page is 4096 blocks).
                    while b < page_end {
                        let i = b % PAGE_BLOCKS;
                        let word = bits[(i / 64) as usize];
                        let differs = if state { !word } else { word } >> (i % 64);
                        if differs != 0 {
                            return (b + u64::from(differs.trailing_zeros())).min(end);
                        }
                        b += 64 - i % 64;
                    }
                }
            }
        }
        end
    }

    /// Blocks marked written.
    pub fn blocks(&self) -> u64 {
        self.blocks
    }

    /// Blocks of `[first, end)` not written yet.
    pub fn unset_in(&self, first: u64, end: u64) -> u64 {
        let mut n = 0;
        let mut b = first;
        while b < end {
            let page = b / PAGE_BLOCKS;
            let page_end = ((page + 1) * PAGE_BLOCKS).min(end);
            n += match self.pages.get(&page) {
                None => page_end - b,
                Some(Page::Full) => 0,
                Some(Page::Bits(_)) => (b..page_end).filter(|x| !self.get(*x)).count() as u64,
            };
            b = page_end;
        }
        n
    }

    /// Marks blocks `[first, end)` written.
    pub fn set_range(&mut self, first: u64, end: u64) {
        self.blocks += self.unset_in(first, end);
        let mut b = first;
        while b < end {
            let page = b / PAGE_BLOCKS;
            let page_end = ((page + 1) * PAGE_BLOCKS).min(end);
            if b.is_multiple_of(PAGE_BLOCKS) && page_end - b == PAGE_BLOCKS {
                self.pages.insert(page, Page::Full);
            } else {
                let p = self
                    .pages
                    .entry(page)
                    .or_insert_with(|| Page::Bits(Box::new([0; (PAGE_BLOCKS / 64) as usize])));
                if let Page::Bits(bits) = p {
                    for x in b..page_end {
                        let i = x % PAGE_BLOCKS;
                        bits[(i / 64) as usize] |= 1 << (i % 64);
                    }
                    if bits.iter().all(|w| *w == u64::MAX) {
                        *p = Page::Full;
                    }
                }
            }
            b = page_end;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_block_map_marks_pages_whole() {
        let mut m = BlockMap::default();
        m.set_range(5, 6);
        assert!(m.get(5) && !m.get(4) && !m.get(6));
        assert_eq!(m.unset_in(0, 10), 9);
        m.set_range(0, 3 * PAGE_BLOCKS + 7);
        assert!(m.get(0) && m.get(3 * PAGE_BLOCKS + 6) && !m.get(3 * PAGE_BLOCKS + 7));
        assert_eq!(m.pages.len(), 4);
        assert!(matches!(m.pages[&1], Page::Full));
        assert_eq!(m.blocks(), 3 * PAGE_BLOCKS + 7);
        assert_eq!(m.unset_in(0, 4 * PAGE_BLOCKS), PAGE_BLOCKS - 7);
    }

    #[test]
    fn run_end_agrees_with_a_block_by_block_walk() {
        let mut m = BlockMap::default();
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..200 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let first = x % (6 * PAGE_BLOCKS);
            let n = if x.is_multiple_of(7) {
                PAGE_BLOCKS
            } else {
                x % 150
            };
            m.set_range(first, first + n);
        }
        let end = 7 * PAGE_BLOCKS + 13;
        let mut b = 0;
        while b < end {
            let mut walk = b + 1;
            while walk < end && m.get(walk) == m.get(b) {
                walk += 1;
            }
            assert_eq!(m.run_end(b, end), walk, "from block {b}");
            b = walk;
        }
        for b in [0, 63, 64, 4095, 4096, 9000] {
            assert!(m.run_end(b, b + 1) == b + 1);
        }
    }
}
