//! The oracle of the kill tests: what a writer did, and which of its flush
//! states an image holds.

/// What the writer did, in order: writes, and flushes the server acknowledged.
pub enum Op {
    Write(u64, Vec<u8>),
    Flush,
}

/// Replays `log` over `initial` and returns the index of the first flush
/// (0: before any write) at which the image equals `state`, if any.
pub fn flush_state_index(initial: &[u8], log: &[Op], state: &[u8]) -> Option<usize> {
    const BLOCK: usize = 4096;
    let mut model = initial.to_vec();
    let differs =
        |m: &[u8], b: usize| m[b * BLOCK..(b + 1) * BLOCK] != state[b * BLOCK..(b + 1) * BLOCK];
    let mut diff: std::collections::HashSet<usize> = (0..model.len() / BLOCK)
        .filter(|&b| differs(&model, b))
        .collect();
    if diff.is_empty() {
        return Some(0);
    }
    let mut flushes = 0;
    for op in log {
        match op {
            Op::Write(off, data) => {
                let off = *off as usize;
                model[off..off + data.len()].copy_from_slice(data);
                for b in off / BLOCK..(off + data.len()).div_ceil(BLOCK) {
                    if differs(&model, b) {
                        diff.insert(b);
                    } else {
                        diff.remove(&b);
                    }
                }
            }
            Op::Flush => {
                flushes += 1;
                if diff.is_empty() {
                    return Some(flushes);
                }
            }
        }
    }
    None
}
