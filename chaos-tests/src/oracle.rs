//! What the writer did, and the two checks made against it: an image that
//! must hold every acknowledged flush (the primary after a crash or power
//! cut), and an image that must be exactly one flush state (a replica).

use std::collections::{HashMap, HashSet};

pub const BLOCK: usize = 4096;

/// The writer's history, in order.
#[derive(Clone)]
pub enum Op {
    /// A write the server acknowledged.
    Write(u64, Vec<u8>),
    /// A write that failed (or whose answer never came): its range holds
    /// anything until written again.
    MaybeWrite(u64, Vec<u8>),
    /// A flush the server acknowledged: everything before it is durable.
    Flush,
    /// A flush that failed: it promises nothing.
    FailedFlush,
}

pub fn acked_flushes(log: &[Op]) -> usize {
    log.iter().filter(|o| matches!(o, Op::Flush)).count()
}

pub fn acked_bytes(log: &[Op]) -> u64 {
    log.iter()
        .map(|o| match o {
            Op::Write(_, d) => d.len() as u64,
            _ => 0,
        })
        .sum()
}

fn blocks(off: u64, len: usize) -> std::ops::Range<usize> {
    off as usize / BLOCK..(off as usize + len).div_ceil(BLOCK)
}

/// The image must hold every write an acknowledged flush covered: each
/// block equals the model at the last acknowledged flush, or a value a
/// later write gave it; blocks of a failed write not written again since
/// are free. Returns the violations (empty: none).
pub fn check_durable(initial: &[u8], log: &[Op], image: &[u8]) -> Vec<String> {
    if image.len() != initial.len() {
        return vec![format!(
            "the image is {} bytes, not {}",
            image.len(),
            initial.len()
        )];
    }
    let last = log
        .iter()
        .rposition(|o| matches!(o, Op::Flush))
        .unwrap_or(0);
    let mut model = initial.to_vec();
    let mut free: HashSet<usize> = HashSet::new();
    let mut later: HashMap<usize, Vec<Vec<u8>>> = HashMap::new();
    for (i, op) in log.iter().enumerate() {
        let (off, data, maybe) = match op {
            Op::Write(o, d) => (*o, d, false),
            Op::MaybeWrite(o, d) => (*o, d, true),
            _ => continue,
        };
        if i < last {
            let o = off as usize;
            model[o..o + data.len()].copy_from_slice(data);
            for b in blocks(off, data.len()) {
                if maybe {
                    free.insert(b);
                } else {
                    free.remove(&b);
                }
            }
        } else {
            for b in blocks(off, data.len()) {
                if maybe {
                    // A failed write may be torn anywhere.
                    free.insert(b);
                }
                let s = b * BLOCK - off as usize;
                later
                    .entry(b)
                    .or_default()
                    .push(data[s..s + BLOCK].to_vec());
            }
        }
    }
    let mut out = Vec::new();
    for b in 0..image.len() / BLOCK {
        let got = &image[b * BLOCK..(b + 1) * BLOCK];
        if free.contains(&b) || got == &model[b * BLOCK..(b + 1) * BLOCK] {
            continue;
        }
        if later.get(&b).is_some_and(|v| v.iter().any(|d| d == got)) {
            continue;
        }
        out.push(format!(
            "block at {} holds neither what the last acknowledged flush covered nor a later write: {}",
            b * BLOCK,
            explain_block(initial, log, image, b)
        ));
        if out.len() >= 5 {
            break;
        }
    }
    out
}

/// The flush state the image is exactly, if any, as the number of
/// acknowledged flushes at or before it (0: the initial image). A flush
/// that failed counts as a possible state (its answer may have been lost).
pub fn flush_state(initial: &[u8], log: &[Op], image: &[u8]) -> Option<usize> {
    if image.len() != initial.len() {
        return None;
    }
    let mut model = initial.to_vec();
    let differs =
        |m: &[u8], b: usize| m[b * BLOCK..(b + 1) * BLOCK] != image[b * BLOCK..(b + 1) * BLOCK];
    let mut diff: HashSet<usize> = (0..model.len() / BLOCK)
        .filter(|&b| differs(&model, b))
        .collect();
    let mut found = diff.is_empty().then_some(0);
    let mut flushes = 0;
    for op in log {
        match op {
            Op::Write(off, data) | Op::MaybeWrite(off, data) => {
                let o = *off as usize;
                model[o..o + data.len()].copy_from_slice(data);
                for b in blocks(*off, data.len()) {
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
                    // The newest matching state: states can repeat.
                    found = Some(flushes);
                }
            }
            // A flush whose answer was lost (the server died) may still
            // have happened: its state is a flush state too, after the
            // acknowledged ones before it.
            Op::FailedFlush => {
                if diff.is_empty() {
                    found = Some(flushes);
                }
            }
        }
    }
    found
}

/// For a report: where the value a block should hold came from and where
/// the value it holds came from (op index and the flushes before it).
pub fn explain_block(initial: &[u8], log: &[Op], image: &[u8], b: usize) -> String {
    let r = b * BLOCK..(b + 1) * BLOCK;
    let got = &image[r.clone()];
    let last = log
        .iter()
        .rposition(|o| matches!(o, Op::Flush))
        .unwrap_or(0);
    let mut want = None;
    let mut found = (got == &initial[r.clone()]).then(|| "the initial image".to_string());
    let mut flushes = 0;
    for (i, op) in log.iter().enumerate() {
        match op {
            Op::Write(off, data) | Op::MaybeWrite(off, data) => {
                let o = *off as usize;
                if o <= r.start && r.end <= o + data.len() {
                    let d = &data[r.start - o..r.end - o];
                    if i < last {
                        want = Some(format!("op {i} (after flush {flushes})"));
                    }
                    if d == got {
                        found = Some(format!("op {i} (after flush {flushes})"));
                    }
                }
            }
            Op::Flush => flushes += 1,
            Op::FailedFlush => {}
        }
    }
    format!(
        "want {} , found {} (the last acknowledged flush is op {last}, flush {})",
        want.unwrap_or_else(|| "the initial image".into()),
        found.unwrap_or_else(|| "nothing the writer wrote".into()),
        acked_flushes(log)
    )
}

/// A listing of the writer's log, one op per line (kept with a failed run).
pub fn listing(log: &[Op]) -> String {
    let mut out = String::new();
    let mut flushes = 0;
    for (i, op) in log.iter().enumerate() {
        let line = match op {
            Op::Write(o, d) => format!(
                "{i} write {o} {} {}",
                d.len(),
                &blake3::hash(d).to_hex()[..12]
            ),
            Op::MaybeWrite(o, d) => format!(
                "{i} maybe-write {o} {} {}",
                d.len(),
                &blake3::hash(d).to_hex()[..12]
            ),
            Op::Flush => {
                flushes += 1;
                format!("{i} flush {flushes}")
            }
            Op::FailedFlush => format!("{i} failed-flush"),
        };
        out.push_str(&line);
        out.push('\n');
    }
    out
}

/// For a report: the acknowledged flush state nearest the image (fewest
/// differing blocks), how many blocks differ, and the first of them.
pub fn nearest_state(initial: &[u8], log: &[Op], image: &[u8]) -> (usize, usize, Option<usize>) {
    let mut model = initial.to_vec();
    let count = |m: &[u8]| {
        let d: Vec<usize> = (0..m.len() / BLOCK)
            .filter(|&b| m[b * BLOCK..(b + 1) * BLOCK] != image[b * BLOCK..(b + 1) * BLOCK])
            .collect();
        (d.len(), d.first().map(|b| b * BLOCK))
    };
    let (n, first) = count(&model);
    let mut best = (0, n, first);
    let mut flushes = 0;
    for op in log {
        match op {
            Op::Write(off, data) | Op::MaybeWrite(off, data) => {
                let o = *off as usize;
                model[o..o + data.len()].copy_from_slice(data);
            }
            Op::Flush => {
                flushes += 1;
                let (n, first) = count(&model);
                if n <= best.1 {
                    best = (flushes, n, first);
                }
            }
            Op::FailedFlush => {}
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_checks_tell_a_lost_flush_from_a_kept_one() {
        let initial = vec![0u8; 4 * BLOCK];
        let log = vec![
            Op::Write(0, vec![1; BLOCK]),
            Op::Flush,
            Op::Write(BLOCK as u64, vec![2; BLOCK]),
            Op::Flush,
            Op::Write(2 * BLOCK as u64, vec![3; BLOCK]),
        ];
        let mut img = initial.clone();
        img[..BLOCK].fill(1);
        img[BLOCK..2 * BLOCK].fill(2);
        assert!(check_durable(&initial, &log, &img).is_empty());
        assert_eq!(flush_state(&initial, &log, &img), Some(2));
        img[2 * BLOCK..3 * BLOCK].fill(3); // an unflushed write may be there
        assert!(check_durable(&initial, &log, &img).is_empty());
        assert_eq!(flush_state(&initial, &log, &img), None);
        img[BLOCK..2 * BLOCK].fill(0); // the second flush lost
        assert_eq!(check_durable(&initial, &log, &img).len(), 1);
        let failed = vec![Op::MaybeWrite(0, vec![9; BLOCK]), Op::Flush];
        assert!(check_durable(&initial, &failed, &initial).is_empty());
    }
}
