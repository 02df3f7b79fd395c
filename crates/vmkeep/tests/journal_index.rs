//! The reader's index of an undo journal (`JournalIndex`): built from record headers,
//! extended as the journal grows instead of rebuilt, never indexing a torn record, and
//! refreshed records read back whole.

use vmkeep::archive::digest::block_digest;
use vmkeep::archive::rdiff::{JournalIndex, RdiffHeader, RdiffWriter, Record};

const BS: u32 = 4096;

fn block(seed: u8) -> Vec<u8> {
    (0..BS as usize)
        .map(|i| (i as u8).wrapping_mul(seed) ^ seed)
        .collect()
}

#[test]
fn a_journal_index_grows_with_the_journal_and_skips_a_torn_tail() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("vda.rdiff.partial");
    let header = RdiffHeader {
        flags: 0,
        block_size: BS,
        compression: 1,
        disk_size: 64 * BS as u64,
        next_size: 64 * BS as u64,
        generation: [7; 16],
    };
    let mut w = RdiffWriter::create(&path, header).unwrap();
    let rec = |b: u64| {
        let data = block(b as u8 + 1);
        Record::with_data(b, &data, block_digest(&data), 3, false)
    };
    for b in [1, 5, 9] {
        w.append(&rec(b)).unwrap();
    }
    w.sync().unwrap();
    let mut idx = JournalIndex::open(&path)
        .unwrap()
        .expect("a readable header");
    assert_eq!(idx.records(), 3);
    assert_eq!(idx.header.generation, [7; 16]);
    assert!(idx.get(5).unwrap().unwrap().data(&path).unwrap() == block(6));
    assert!(idx.get(6).unwrap().is_none());
    assert!(idx.get(20).unwrap().is_none());

    // Two more records: the index is extended, and finds them.
    for b in [12, 20] {
        w.append(&rec(b)).unwrap();
    }
    w.sync().unwrap();
    assert!(idx.get(20).unwrap().is_none(), "not before extend");
    idx.extend().unwrap();
    assert_eq!(idx.records(), 5);
    assert!(idx.get(20).unwrap().unwrap().data(&path).unwrap() == block(21));
    assert!(idx.get(1).unwrap().unwrap().data(&path).unwrap() == block(2));

    // A torn record (its body cut short) is not indexed; once complete, it is.
    let full = std::fs::read(&path).unwrap();
    w.append(&rec(30)).unwrap();
    w.sync().unwrap();
    let whole = std::fs::read(&path).unwrap();
    std::fs::write(&path, &whole[..full.len() + 64 + 10]).unwrap();
    idx.extend().unwrap();
    assert_eq!(idx.records(), 5, "a torn record is not indexed");
    std::fs::write(&path, &whole).unwrap();
    idx.extend().unwrap();
    assert_eq!(idx.records(), 6);
    assert!(idx.get(30).unwrap().unwrap().data(&path).unwrap() == block(31));
}
