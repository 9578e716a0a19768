//! Kernel module BTF for CO-RE: `/sys/kernel/btf/<module>` is *split* BTF,
//! whose type ids and string offsets continue those of
//! `/sys/kernel/btf/vmlinux`. aya 0.14 relocates against one self-contained
//! BTF, so the two are merged: vmlinux's types then the module's, vmlinux's
//! strings then the module's. Because split BTF already numbers its types
//! after the base's last one and offsets its strings by the base's string
//! section length, the concatenation needs no renumbering.
//!
//! Plain byte handling, built on every platform; malformed input is an
//! error, never a panic.

/// `BTF_MAGIC` in the running machine's byte order.
const MAGIC: u16 = 0xeb9f;
/// The header this code writes (and the smallest it reads).
const HEADER_LEN: usize = 24;
#[allow(clippy::cast_possible_truncation)] // 24
const HEADER_LEN_U32: u32 = HEADER_LEN as u32;

/// Why two BTF blobs could not be merged.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BtfMergeError {
    #[error("{which} BTF is {len} bytes, shorter than its header")]
    Short { which: &'static str, len: usize },
    #[error("{which} BTF has magic {magic:#06x}, not {MAGIC:#06x} (other byte order or not BTF)")]
    Magic { which: &'static str, magic: u16 },
    #[error("{which} BTF's {section} section lies outside the data")]
    Section {
        which: &'static str,
        section: &'static str,
    },
    #[error("the merged BTF would exceed 4 GiB")]
    TooLarge,
}

struct Sections<'a> {
    types: &'a [u8],
    strings: &'a [u8],
}

fn u32_at(data: &[u8], at: usize) -> u32 {
    let mut b = [0; 4];
    if let Some(src) = data.get(at..at + 4) {
        b.copy_from_slice(src);
    }
    u32::from_ne_bytes(b)
}

fn sections<'a>(which: &'static str, data: &'a [u8]) -> Result<Sections<'a>, BtfMergeError> {
    if data.len() < HEADER_LEN {
        return Err(BtfMergeError::Short {
            which,
            len: data.len(),
        });
    }
    let magic = u16::from_ne_bytes([data[0], data[1]]);
    if magic != MAGIC {
        return Err(BtfMergeError::Magic { which, magic });
    }
    let hdr_len = u32_at(data, 4) as usize;
    let section = |section, off: u32, len: u32| {
        let start = hdr_len.checked_add(off as usize);
        let end = start.and_then(|s| s.checked_add(len as usize));
        match (start, end) {
            (Some(s), Some(e)) if hdr_len >= HEADER_LEN && e <= data.len() => Ok(&data[s..e]),
            _ => Err(BtfMergeError::Section { which, section }),
        }
    };
    Ok(Sections {
        types: section("type", u32_at(data, 8), u32_at(data, 12))?,
        strings: section("string", u32_at(data, 16), u32_at(data, 20))?,
    })
}

/// One self-contained BTF from `base` (vmlinux) and `split` (a module's).
pub fn merge_split_btf(base: &[u8], split: &[u8]) -> Result<Vec<u8>, BtfMergeError> {
    let b = sections("base", base)?;
    let s = sections("module", split)?;
    let type_len = b.types.len() + s.types.len();
    let str_len = b.strings.len() + s.strings.len();
    let (Ok(type_len32), Ok(str_len32)) = (u32::try_from(type_len), u32::try_from(str_len)) else {
        return Err(BtfMergeError::TooLarge);
    };
    let mut out = Vec::with_capacity(HEADER_LEN + type_len + str_len);
    out.extend_from_slice(&MAGIC.to_ne_bytes());
    out.push(1); // version
    out.push(0); // flags
    for v in [HEADER_LEN_U32, 0, type_len32, type_len32, str_len32] {
        out.extend_from_slice(&v.to_ne_bytes());
    }
    for part in [b.types, s.types, b.strings, s.strings] {
        out.extend_from_slice(part);
    }
    Ok(out)
}

/// Test helpers: tiny hand-built BTF blobs (also used by the loader's tests).
#[cfg(test)]
pub(crate) mod testdata {
    const KIND_INT: u32 = 1;
    const KIND_STRUCT: u32 = 4;

    pub(crate) fn blob(types: &[u8], strings: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&0xeb9f_u16.to_ne_bytes());
        out.extend_from_slice(&[1, 0]);
        let (t, s) = (
            u32::try_from(types.len()).unwrap(),
            u32::try_from(strings.len()).unwrap(),
        );
        for v in [24, 0, t, t, s] {
            out.extend_from_slice(&u32::to_ne_bytes(v));
        }
        out.extend_from_slice(types);
        out.extend_from_slice(strings);
        out
    }

    fn words(w: &[u32]) -> Vec<u8> {
        w.iter().flat_map(|v| v.to_ne_bytes()).collect()
    }

    /// vmlinux stand-in: type 1 is `int`.
    pub(crate) fn base() -> Vec<u8> {
        let types = words(&[1, KIND_INT << 24, 4, 32]);
        blob(&types, b"\0int\0")
    }

    /// `ib_core` stand-in, split on [`base`]: type 2 is `struct ib_qp { int
    /// qp_num; }` at offset 0. Its strings start at the base's length (5).
    pub(crate) fn split() -> Vec<u8> {
        let types = words(&[5, (KIND_STRUCT << 24) | 1, 4, 11, 1, 0]);
        blob(&types, b"ib_qp\0qp_num\0")
    }
}

#[cfg(test)]
mod tests {
    use super::testdata::{base, blob, split};
    use super::*;

    #[test]
    fn merged_btf_is_the_base_then_the_module_with_one_header() {
        let merged = merge_split_btf(&base(), &split()).unwrap();
        let b = sections("base", &base()).map(|s| (s.types.to_vec(), s.strings.to_vec()));
        let m = sections("module", &split()).map(|s| (s.types.to_vec(), s.strings.to_vec()));
        let ((bt, bs), (mt, ms)) = (b.unwrap(), m.unwrap());
        let out = sections("merged", &merged).unwrap();
        assert_eq!(out.types, [bt, mt].concat());
        assert_eq!(out.strings, [bs.clone(), ms].concat());
        // The module's names sit at the offsets the split BTF used.
        assert_eq!(&out.strings[5..10], b"ib_qp");
        assert_eq!(&out.strings[11..17], b"qp_num");
        assert_eq!(
            merged.len(),
            HEADER_LEN + out.types.len() + out.strings.len()
        );
    }

    #[test]
    fn malformed_btf_is_an_error_never_a_panic() {
        assert_eq!(
            merge_split_btf(&[], &split()),
            Err(BtfMergeError::Short {
                which: "base",
                len: 0
            })
        );
        let mut swapped = base();
        swapped.swap(0, 1);
        assert!(matches!(
            merge_split_btf(&swapped, &split()),
            Err(BtfMergeError::Magic { which: "base", .. })
        ));
        let mut long = split();
        long[20..24].copy_from_slice(&u32::MAX.to_ne_bytes());
        assert_eq!(
            merge_split_btf(&base(), &long),
            Err(BtfMergeError::Section {
                which: "module",
                section: "string"
            })
        );
        // Every truncation of a valid blob: an error, never a panic.
        let good = split();
        for len in 0..good.len() {
            assert!(merge_split_btf(&base(), &good[..len]).is_err(), "{len}");
        }
        assert!(merge_split_btf(&base(), &blob(&[], &[])).is_ok());
    }
}
