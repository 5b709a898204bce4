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
}
