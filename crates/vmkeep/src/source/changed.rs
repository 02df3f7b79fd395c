//! Changed-block lists handed in by an outside tracker (`--changed-blocks NAME=FILE`).
//!
//! Two forms are read: text lines `OFFSET LENGTH` in bytes (blank lines and `#` comments
//! allowed), and the JSON that vSphere's QueryChangedDiskAreas returns: a list of
//! `{"start": …, "length": …}` objects, bare or under a `changedArea` key.

use std::path::Path;

use crate::error::{Error, Result};

/// Parse a changed-block list; extents are returned as given (the engine sorts and merges).
pub fn parse(path: &Path, text: &str) -> Result<Vec<(u64, u64)>> {
    let bad = |what: String| Error::usage(format!("changed-block list {}: {what}", path.display()));
    let trimmed = text.trim_start();
    if trimmed.starts_with('[') || trimmed.starts_with('{') {
        let v: serde_json::Value =
            serde_json::from_str(text).map_err(|e| bad(format!("invalid JSON: {e}")))?;
        let list = match &v {
            serde_json::Value::Array(a) => a,
            serde_json::Value::Object(o) => match o.get("changedArea") {
                Some(serde_json::Value::Array(a)) => a,
                _ => {
                    return Err(bad(
                        "expected a list of {\"start\", \"length\"} objects".into()
                    ))
                }
            },
            _ => {
                return Err(bad(
                    "expected a list of {\"start\", \"length\"} objects".into()
                ))
            }
        };
        list.iter()
            .enumerate()
            .map(|(i, e)| {
                let field = |k: &str| e.get(k).and_then(|x| x.as_u64());
                match (field("start"), field("length")) {
                    (Some(s), Some(l)) => Ok((s, l)),
                    _ => Err(bad(format!("entry {i} lacks a numeric start and length"))),
                }
            })
            .collect()
    } else {
        let mut out = Vec::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.split('#').next().unwrap_or("").trim();
            if line.is_empty() {
                continue;
            }
            let mut it = line.split_whitespace();
            let parsed = (it.next().and_then(num), it.next().and_then(num), it.next());
            match parsed {
                (Some(o), Some(l), None) => out.push((o, l)),
                _ => {
                    return Err(bad(format!(
                        "line {}: expected 'OFFSET LENGTH', got {line:?}",
                        n + 1
                    )))
                }
            }
        }
        Ok(out)
    }
}

fn num(s: &str) -> Option<u64> {
    match s.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16).ok(),
        None => s.parse().ok(),
    }
}

/// Turn byte extents into sorted, merged block ranges `[first, end)`, clipped to `blocks`.
pub fn to_block_ranges(extents: &[(u64, u64)], block_size: u32, blocks: u64) -> Vec<(u64, u64)> {
    let bs = block_size as u64;
    let mut r: Vec<(u64, u64)> = extents
        .iter()
        .filter(|&&(_, len)| len > 0)
        .map(|&(off, len)| (off / bs, off.saturating_add(len).div_ceil(bs).min(blocks)))
        .filter(|&(a, b)| a < b)
        .collect();
    merge_ranges(&mut r);
    r
}

/// Sort and merge overlapping or touching ranges in place.
pub fn merge_ranges(r: &mut Vec<(u64, u64)>) {
    r.sort_unstable();
    let mut out: Vec<(u64, u64)> = Vec::with_capacity(r.len());
    for &(a, b) in r.iter() {
        match out.last_mut() {
            Some(last) if a <= last.1 => last.1 = last.1.max(b),
            _ => out.push((a, b)),
        }
    }
    *r = out;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_and_vsphere_json() {
        let p = Path::new("x");
        assert_eq!(
            parse(p, "# c\n0 4096\n\n 1048576  65536 \n").unwrap(),
            vec![(0, 4096), (1 << 20, 65536)]
        );
        let js = r#"{"length": 100, "changedArea": [{"start": 0, "length": 65536}, {"start": 131072, "length": 4096}]}"#;
        assert_eq!(parse(p, js).unwrap(), vec![(0, 65536), (131072, 4096)]);
        assert_eq!(
            parse(p, r#"[{"start": 5, "length": 6}]"#).unwrap(),
            vec![(5, 6)]
        );
        assert!(parse(p, "12 x\n")
            .unwrap_err()
            .to_string()
            .contains("line 1"));
        assert!(parse(p, "[{\"start\": 1}]").is_err());
    }

    #[test]
    fn block_ranges_merge_and_clip() {
        let r = to_block_ranges(
            &[(70000, 10), (0, 1), (65536, 1), (10 << 20, 1 << 30)],
            65536,
            200,
        );
        assert_eq!(r, vec![(0, 2), (160, 200)]);
    }
}
