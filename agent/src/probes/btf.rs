//! A small reader for kernel BTF (`/sys/kernel/btf/vmlinux`): enough to find struct member
//! offsets, including members inside anonymous structs and unions.
//!
//! Format: `include/uapi/linux/btf.h` and Documentation/bpf/btf.rst.

use std::{collections::HashMap, path::Path};

const BTF_MAGIC: u16 = 0xeb9f;

// BTF kinds.
const KIND_INT: u32 = 1;
const KIND_PTR: u32 = 2;
const KIND_ARRAY: u32 = 3;
const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;
const KIND_ENUM: u32 = 6;
const KIND_FWD: u32 = 7;
const KIND_TYPEDEF: u32 = 8;
const KIND_VOLATILE: u32 = 9;
const KIND_CONST: u32 = 10;
const KIND_RESTRICT: u32 = 11;
const KIND_FUNC: u32 = 12;
const KIND_FUNC_PROTO: u32 = 13;
const KIND_VAR: u32 = 14;
const KIND_DATASEC: u32 = 15;
const KIND_FLOAT: u32 = 16;
const KIND_DECL_TAG: u32 = 17;
const KIND_TYPE_TAG: u32 = 18;
const KIND_ENUM64: u32 = 19;

#[derive(Debug, thiserror::Error)]
pub enum BtfError {
    #[error("cannot read kernel BTF at {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("kernel BTF is malformed: {0}")]
    Malformed(&'static str),
    #[error("kernel BTF has no struct {0}")]
    NoStruct(String),
    #[error("kernel BTF has no member {member} in struct {strukt}")]
    NoMember { strukt: String, member: String },
    #[error("member {member} of struct {strukt} is a bitfield")]
    Bitfield { strukt: String, member: String },
}

#[derive(Clone, Debug)]
struct Member {
    name_off: u32,
    type_id: u32,
    /// Bit offset from the start of the enclosing struct.
    bit_offset: u32,
    /// Non-zero for bitfields.
    bitfield_size: u32,
}

#[derive(Clone, Debug)]
struct Type {
    kind: u32,
    name_off: u32,
    /// Size (int, struct, union, enum, float) or referenced type id (ptr, typedef, modifiers).
    size_or_type: u32,
    members: Vec<Member>,
    /// Number of members, parameters or values (`vlen`).
    vlen: u32,
}

/// Parsed BTF types and strings.
pub struct Btf {
    /// Index 0 is `void`.
    types: Vec<Type>,
    strings: Vec<u8>,
    structs_by_name: HashMap<String, u32>,
    /// Enumerator values by name (the first definition wins).
    enumerators: HashMap<String, i64>,
}

/// Where a member lives: byte offset and size in bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemberLoc {
    pub offset: u32,
    pub size: u32,
}

fn u16_at(b: &[u8], off: usize) -> Result<u16, BtfError> {
    b.get(off..off + 2)
        .map(|s| u16::from_le_bytes([s[0], s[1]]))
        .ok_or(BtfError::Malformed("truncated"))
}

fn u32_at(b: &[u8], off: usize) -> Result<u32, BtfError> {
    b.get(off..off + 4)
        .map(|s| u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
        .ok_or(BtfError::Malformed("truncated"))
}

impl Btf {
    /// Reads the running kernel's BTF.
    pub fn from_sys_fs() -> Result<Self, BtfError> {
        Self::from_file(Path::new("/sys/kernel/btf/vmlinux"))
    }

    pub fn from_file(path: &Path) -> Result<Self, BtfError> {
        let data = std::fs::read(path).map_err(|source| BtfError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(&data)
    }

    pub fn parse(data: &[u8]) -> Result<Self, BtfError> {
        if u16_at(data, 0)? != BTF_MAGIC {
            return Err(BtfError::Malformed("bad magic (not little-endian BTF)"));
        }
        let hdr_len = u32_at(data, 4)? as usize;
        let type_off = u32_at(data, 8)? as usize;
        let type_len = u32_at(data, 12)? as usize;
        let str_off = u32_at(data, 16)? as usize;
        let str_len = u32_at(data, 20)? as usize;
        let types_sec = data
            .get(hdr_len + type_off..hdr_len + type_off + type_len)
            .ok_or(BtfError::Malformed("type section out of bounds"))?;
        let strings = data
            .get(hdr_len + str_off..hdr_len + str_off + str_len)
            .ok_or(BtfError::Malformed("string section out of bounds"))?
            .to_vec();

        let mut types = vec![Type {
            kind: 0,
            name_off: 0,
            size_or_type: 0,
            members: Vec::new(),
            vlen: 0,
        }];
        let mut enumerators: Vec<(u32, i64)> = Vec::new();
        let mut pos = 0;
        while pos < types_sec.len() {
            let name_off = u32_at(types_sec, pos)?;
            let info = u32_at(types_sec, pos + 4)?;
            let size_or_type = u32_at(types_sec, pos + 8)?;
            pos += 12;
            let vlen = (info & 0xffff) as usize;
            let kind = (info >> 24) & 0x1f;
            let kind_flag = info >> 31 == 1;
            let mut members = Vec::new();
            let extra = match kind {
                KIND_INT => 4,
                KIND_PTR | KIND_FWD | KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT
                | KIND_FUNC | KIND_FLOAT | KIND_TYPE_TAG => 0,
                KIND_ARRAY => 12,
                KIND_STRUCT | KIND_UNION => {
                    for i in 0..vlen {
                        let m = pos + i * 12;
                        let raw_offset = u32_at(types_sec, m + 8)?;
                        let (bit_offset, bitfield_size) = if kind_flag {
                            (raw_offset & 0x00ff_ffff, raw_offset >> 24)
                        } else {
                            (raw_offset, 0)
                        };
                        members.push(Member {
                            name_off: u32_at(types_sec, m)?,
                            type_id: u32_at(types_sec, m + 4)?,
                            bit_offset,
                            bitfield_size,
                        });
                    }
                    vlen * 12
                }
                KIND_ENUM => {
                    for i in 0..vlen {
                        let e = pos + i * 8;
                        enumerators.push((
                            u32_at(types_sec, e)?,
                            i64::from(u32_at(types_sec, e + 4)? as i32),
                        ));
                    }
                    vlen * 8
                }
                KIND_FUNC_PROTO => vlen * 8,
                KIND_VAR => 4,
                KIND_DATASEC => vlen * 12,
                KIND_DECL_TAG => 4,
                KIND_ENUM64 => {
                    for i in 0..vlen {
                        let e = pos + i * 12;
                        let lo = u64::from(u32_at(types_sec, e + 4)?);
                        let hi = u64::from(u32_at(types_sec, e + 8)?);
                        enumerators.push((u32_at(types_sec, e)?, (hi << 32 | lo) as i64));
                    }
                    vlen * 12
                }
                _ => return Err(BtfError::Malformed("unknown type kind")),
            };
            pos += extra;
            types.push(Type {
                kind,
                name_off,
                size_or_type,
                members,
                vlen: vlen as u32,
            });
        }
        if pos != types_sec.len() {
            return Err(BtfError::Malformed("type section ends inside a type"));
        }

        let mut btf = Btf {
            types,
            strings,
            structs_by_name: HashMap::new(),
            enumerators: HashMap::new(),
        };
        let mut values = HashMap::new();
        for (name_off, value) in enumerators {
            let name = btf.name(name_off);
            if !name.is_empty() {
                values.entry(name.to_owned()).or_insert(value);
            }
        }
        btf.enumerators = values;
        let mut by_name = HashMap::new();
        for (id, t) in btf.types.iter().enumerate() {
            if (t.kind == KIND_STRUCT || t.kind == KIND_UNION) && t.size_or_type > 0 {
                let name = btf.name(t.name_off);
                if !name.is_empty() {
                    by_name.entry(name.to_owned()).or_insert(id as u32);
                }
            }
        }
        btf.structs_by_name = by_name;
        Ok(btf)
    }

    fn name(&self, off: u32) -> &str {
        let rest = self.strings.get(off as usize..).unwrap_or_default();
        let end = rest.iter().position(|b| *b == 0).unwrap_or(rest.len());
        std::str::from_utf8(&rest[..end]).unwrap_or_default()
    }

    /// Follows typedefs and qualifiers to the underlying type id.
    fn resolve(&self, mut id: u32) -> u32 {
        for _ in 0..32 {
            match self.types.get(id as usize) {
                Some(t)
                    if matches!(
                        t.kind,
                        KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT | KIND_TYPE_TAG
                    ) =>
                {
                    id = t.size_or_type
                }
                _ => break,
            }
        }
        id
    }

    /// Size in bytes of a type (after resolving typedefs); pointers are 8.
    fn size_of(&self, id: u32) -> u32 {
        let id = self.resolve(id);
        match self.types.get(id as usize) {
            Some(t) if t.kind == KIND_PTR => 8,
            Some(t)
                if matches!(
                    t.kind,
                    KIND_INT | KIND_STRUCT | KIND_UNION | KIND_ENUM | KIND_ENUM64 | KIND_FLOAT
                ) =>
            {
                t.size_or_type
            }
            _ => 0,
        }
    }

    /// Finds `member` in the struct/union `id`, looking into anonymous members. Returns the
    /// member and its bit offset from the start of `id`.
    fn find_member(&self, id: u32, member: &str) -> Option<(Member, u32)> {
        let t = self.types.get(self.resolve(id) as usize)?;
        if t.kind != KIND_STRUCT && t.kind != KIND_UNION {
            return None;
        }
        for m in &t.members {
            if self.name(m.name_off) == member {
                return Some((m.clone(), m.bit_offset));
            }
        }
        for m in &t.members {
            if m.name_off == 0
                && let Some((found, inner)) = self.find_member(m.type_id, member)
            {
                return Some((found, m.bit_offset + inner));
            }
        }
        None
    }

    /// Byte offset and size of `path` (e.g. `["f_path", "dentry"]`) inside struct `strukt`.
    pub fn member(&self, strukt: &str, path: &[&str]) -> Result<MemberLoc, BtfError> {
        let mut id = *self
            .structs_by_name
            .get(strukt)
            .ok_or_else(|| BtfError::NoStruct(strukt.to_owned()))?;
        let mut bits = 0u32;
        let mut size = 0u32;
        for (i, part) in path.iter().enumerate() {
            let (m, off) = self
                .find_member(id, part)
                .ok_or_else(|| BtfError::NoMember {
                    strukt: strukt.to_owned(),
                    member: path[..=i].join("."),
                })?;
            if m.bitfield_size != 0 {
                return Err(BtfError::Bitfield {
                    strukt: strukt.to_owned(),
                    member: path[..=i].join("."),
                });
            }
            bits += off;
            size = self.size_of(m.type_id);
            id = m.type_id;
        }
        if !bits.is_multiple_of(8) {
            return Err(BtfError::Malformed("member not byte aligned"));
        }
        Ok(MemberLoc {
            offset: bits / 8,
            size,
        })
    }

    /// The type id of the struct `name`.
    pub fn struct_id(&self, name: &str) -> Result<u32, BtfError> {
        self.structs_by_name
            .get(name)
            .copied()
            .ok_or_else(|| BtfError::NoStruct(name.to_owned()))
    }

    /// The type id of the kernel function `name` (a `FUNC` entry), if BTF describes it.
    pub fn function_id(&self, name: &str) -> Option<u32> {
        self.types
            .iter()
            .position(|t| t.kind == KIND_FUNC && self.name(t.name_off) == name)
            .map(|id| id as u32)
    }

    /// Value of the enumerator `name`, when the kernel defines it in an enum (not a macro).
    pub fn enum_value(&self, name: &str) -> Option<i64> {
        self.enumerators.get(name).copied()
    }

    /// Names of every kernel function BTF describes (the functions `fexit` can attach to).
    pub fn function_names(&self) -> std::collections::HashSet<String> {
        self.types
            .iter()
            .filter(|t| t.kind == KIND_FUNC)
            .map(|t| self.name(t.name_off).to_owned())
            .collect()
    }

    /// True when a typedef `btf_trace_<name>` exists, i.e. the raw tracepoint can take a
    /// `tp_btf` program.
    pub fn has_btf_tracepoint(&self, name: &str) -> bool {
        let want = format!("btf_trace_{name}");
        self.types
            .iter()
            .any(|t| t.kind == KIND_TYPEDEF && self.name(t.name_off) == want)
    }

    /// How many arguments the raw tracepoint `name` passes a `tp_btf` program: the
    /// parameters of `btf_trace_<name>` (a pointer to a function prototype) after the
    /// hidden data pointer.
    pub fn btf_tracepoint_args(&self, name: &str) -> Option<u32> {
        let want = format!("btf_trace_{name}");
        let typedef = self
            .types
            .iter()
            .find(|t| t.kind == KIND_TYPEDEF && self.name(t.name_off) == want)?;
        let ptr = self.types.get(typedef.size_or_type as usize)?;
        if ptr.kind != KIND_PTR {
            return None;
        }
        let proto = self.types.get(ptr.size_or_type as usize)?;
        (proto.kind == KIND_FUNC_PROTO).then(|| proto.vlen.saturating_sub(1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Builds a tiny BTF blob: `struct outer { int a; union { struct { int x; long y; }; }; }`.
    fn sample() -> Vec<u8> {
        let strings = b"\0int\0long\0outer\0a\0x\0y\0inner\0".to_vec();
        let s = |name: &str| -> u32 {
            let hay = &strings;
            let needle = format!("\0{name}\0");
            hay.windows(needle.len())
                .position(|w| w == needle.as_bytes())
                .map(|p| p as u32 + 1)
                .expect("name in table")
        };
        let mut t = Vec::new();
        let mut ty = |name: u32, kind: u32, vlen: u32, size: u32, extra: &[u32]| {
            for v in [name, (kind << 24) | vlen, size] {
                t.extend(v.to_le_bytes());
            }
            for v in extra {
                t.extend(v.to_le_bytes());
            }
        };
        ty(s("int"), KIND_INT, 0, 4, &[32]); // 1
        ty(s("long"), KIND_INT, 0, 8, &[64]); // 2
        // 3: anonymous struct { int x; long y; }
        ty(0, KIND_STRUCT, 2, 16, &[s("x"), 1, 0, s("y"), 2, 64]);
        // 4: anonymous union { struct 3 }
        ty(0, KIND_UNION, 1, 16, &[0, 3, 0]);
        // 5: struct outer { int a; union 4; }
        ty(s("outer"), KIND_STRUCT, 2, 24, &[s("a"), 1, 0, 0, 4, 64]);
        // 6: struct inner { struct outer o; } named member "x" to test paths
        ty(s("inner"), KIND_STRUCT, 1, 24, &[s("x"), 5, 0]);
        let mut out = Vec::new();
        out.extend(BTF_MAGIC.to_le_bytes());
        out.push(1); // version
        out.push(0); // flags
        out.extend(24u32.to_le_bytes()); // hdr_len
        out.extend(0u32.to_le_bytes()); // type_off
        out.extend((t.len() as u32).to_le_bytes());
        out.extend((t.len() as u32).to_le_bytes()); // str_off
        out.extend((strings.len() as u32).to_le_bytes());
        out.extend(&t);
        out.extend(&strings);
        out
    }

    #[test]
    fn finds_members_through_anonymous_unions_and_paths() {
        let btf = Btf::parse(&sample()).expect("parses");
        assert_eq!(btf.member("outer", &["a"]).expect("a").offset, 0);
        assert_eq!(
            btf.member("outer", &["y"]).expect("y"),
            MemberLoc {
                offset: 16,
                size: 8
            }
        );
        assert_eq!(btf.member("outer", &["x"]).expect("x").offset, 8);
        assert_eq!(btf.member("inner", &["x", "y"]).expect("x.y").offset, 16);
        assert!(matches!(
            btf.member("outer", &["nope"]),
            Err(BtfError::NoMember { .. })
        ));
        assert!(matches!(
            btf.member("missing", &["a"]),
            Err(BtfError::NoStruct(_))
        ));
    }

    #[test]
    fn rejects_garbage() {
        assert!(Btf::parse(b"nope").is_err());
        let mut blob = sample();
        blob.truncate(40);
        assert!(Btf::parse(&blob).is_err());
    }

    #[test]
    fn reads_the_running_kernel() {
        // The host's BTF is a fixture every supported machine has.
        let btf = Btf::from_sys_fs().expect("kernel BTF present (CONFIG_DEBUG_INFO_BTF)");
        let pid = btf
            .member("task_struct", &["pid"])
            .expect("task_struct.pid");
        assert_eq!(pid.size, 4);
        let dentry = btf
            .member("file", &["f_path", "dentry"])
            .expect("f_path.dentry");
        assert_eq!(dentry.size, 8);
        assert!(btf.has_btf_tracepoint("sys_exit"));
        // sys_exit(regs, ret); sched_process_exec(p, old_pid, bprm).
        assert_eq!(btf.btf_tracepoint_args("sys_exit"), Some(2));
        assert_eq!(btf.btf_tracepoint_args("sched_process_exec"), Some(3));
        assert_eq!(btf.btf_tracepoint_args("no_such_tracepoint"), None);
        // A well-known enumerator of the running kernel.
        assert_eq!(btf.enum_value("BPF_MAP_TYPE_RINGBUF"), Some(27));
    }
}
