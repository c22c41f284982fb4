//! Field offsets of the running kernel's structs, from its BTF.
//!
//! aya-ebpf has no CO-RE, so the eBPF programs get every kernel struct offset
//! they use (`task_struct.se.sum_exec_runtime`, `tgid`, ...) as read-only
//! globals, resolved here at load time from `/sys/kernel/btf/vmlinux`. No
//! offset is compiled in. The parser is this project's own (about 200 lines
//! over the format of the kernel's Documentation/bpf/btf.rst): aya-obj keeps
//! struct members private, and a small reader avoids taking in a
//! differently-licensed crate for one lookup. It reads only what the lookups
//! need: names, kinds, struct/union members (through anonymous members,
//! typedefs and qualifiers) and function prototypes' parameter names.
use std::path::Path;

use crate::error::AgentError;

const BTF_MAGIC: u16 = 0xeb9f;
const KIND_INT: u32 = 1;
const KIND_PTR: u32 = 2;
const KIND_ARRAY: u32 = 3;
const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;
const KIND_ENUM: u32 = 6;
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

/// A struct/union member or function parameter; for a data section's
/// variable, `bit_offset` holds its byte offset and `bitfield_size` its size.
#[derive(Debug, Clone, Copy)]
struct Member {
    /// Offset of the name in the string section.
    name: u32,
    type_id: u32,
    bit_offset: u32,
    bitfield_size: u32,
}

/// One type record; names stay offsets into the string section (a kernel
/// has some 150,000 types: nothing is allocated per type).
#[derive(Debug, Clone, Copy)]
struct Type {
    kind: u32,
    name: u32,
    /// Size for ints, structs, unions, enums, floats; referenced type otherwise.
    size_or_type: u32,
    /// Struct/union members, or function prototype parameters (offsets 0):
    /// `members[first_member..first_member + member_count]`.
    first_member: u32,
    member_count: u32,
    /// Element type and count of an array.
    array: Option<(u32, u32)>,
}

/// The kernel's BTF, parsed enough to resolve struct member offsets.
#[derive(Debug)]
pub struct KernelBtf {
    /// Index 0 is `void`; type ids index this vector.
    types: Vec<Type>,
    members: Vec<Member>,
    strings: Vec<u8>,
}

/// A resolved member: its byte offset from the start of the outer struct and its size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FieldOffset {
    pub offset: u32,
    pub size: u32,
}

fn btf_err(message: impl Into<String>) -> AgentError {
    AgentError::Ebpf(format!("kernel BTF: {}", message.into()))
}

fn read_u32(data: &[u8], at: usize, little: bool) -> Result<u32, AgentError> {
    let bytes: [u8; 4] = data
        .get(at..at + 4)
        .and_then(|b| b.try_into().ok())
        .ok_or_else(|| btf_err(format!("truncated at byte {at}")))?;
    Ok(if little {
        u32::from_le_bytes(bytes)
    } else {
        u32::from_be_bytes(bytes)
    })
}

impl KernelBtf {
    /// Reads `/sys/kernel/btf/vmlinux`.
    pub fn from_sys_fs() -> Result<Self, AgentError> {
        Self::from_file(Path::new("/sys/kernel/btf/vmlinux"))
    }

    pub fn from_file(path: &Path) -> Result<Self, AgentError> {
        let data = std::fs::read(path)
            .map_err(|e| btf_err(format!("cannot read {}: {e}", path.display())))?;
        Self::parse(&data)
    }

    pub fn parse(data: &[u8]) -> Result<Self, AgentError> {
        let magic = data
            .get(0..2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]))
            .ok_or_else(|| btf_err("empty"))?;
        let little = match magic {
            BTF_MAGIC => true,
            m if m.swap_bytes() == BTF_MAGIC => false,
            m => return Err(btf_err(format!("bad magic {m:#x}"))),
        };
        let hdr_len = read_u32(data, 4, little)? as usize;
        let type_off = read_u32(data, 8, little)? as usize;
        let type_len = read_u32(data, 12, little)? as usize;
        let str_off = read_u32(data, 16, little)? as usize;
        let str_len = read_u32(data, 20, little)? as usize;
        let types_at = hdr_len + type_off;
        let strings = data
            .get(hdr_len + str_off..hdr_len + str_off + str_len)
            .ok_or_else(|| btf_err("string section out of bounds"))?;
        let mut types = vec![Type {
            kind: 0,
            name: 0,
            size_or_type: 0,
            first_member: 0,
            member_count: 0,
            array: None,
        }];
        let mut all_members: Vec<Member> = Vec::new();
        let mut at = types_at;
        let end = types_at + type_len;
        while at < end {
            let name_off = read_u32(data, at, little)?;
            let info = read_u32(data, at + 4, little)?;
            let size_or_type = read_u32(data, at + 8, little)?;
            at += 12;
            let vlen = (info & 0xffff) as usize;
            let kind = (info >> 24) & 0x1f;
            let kind_flag = info >> 31 == 1;
            let first_member = all_members.len() as u32;
            let mut array = None;
            match kind {
                KIND_INT | KIND_VAR | KIND_DECL_TAG => at += 4,
                KIND_ARRAY => {
                    let elem = read_u32(data, at, little)?;
                    let count = read_u32(data, at + 8, little)?;
                    array = Some((elem, count));
                    at += 12;
                }
                KIND_STRUCT | KIND_UNION => {
                    for _ in 0..vlen {
                        let m_name = read_u32(data, at, little)?;
                        let m_type = read_u32(data, at + 4, little)?;
                        let m_off = read_u32(data, at + 8, little)?;
                        let (bit_offset, bitfield_size) = if kind_flag {
                            (m_off & 0x00ff_ffff, m_off >> 24)
                        } else {
                            (m_off, 0)
                        };
                        all_members.push(Member {
                            name: m_name,
                            type_id: m_type,
                            bit_offset,
                            bitfield_size,
                        });
                        at += 12;
                    }
                }
                KIND_ENUM => at += 8 * vlen,
                KIND_FUNC_PROTO => {
                    for _ in 0..vlen {
                        let p_name = read_u32(data, at, little)?;
                        let p_type = read_u32(data, at + 4, little)?;
                        all_members.push(Member {
                            name: p_name,
                            type_id: p_type,
                            bit_offset: 0,
                            bitfield_size: 0,
                        });
                        at += 8;
                    }
                }
                KIND_DATASEC => {
                    // Variables of a section: (VAR type id, byte offset, size).
                    for _ in 0..vlen {
                        let var = read_u32(data, at, little)?;
                        let offset = read_u32(data, at + 4, little)?;
                        let size = read_u32(data, at + 8, little)?;
                        all_members.push(Member {
                            name: 0,
                            type_id: var,
                            bit_offset: offset,
                            bitfield_size: size,
                        });
                        at += 12;
                    }
                }
                KIND_ENUM64 => at += 12 * vlen,
                KIND_PTR | 7 | KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT
                | KIND_FUNC | KIND_FLOAT | KIND_TYPE_TAG => {}
                other => return Err(btf_err(format!("unknown type kind {other}"))),
            }
            types.push(Type {
                kind,
                name: name_off,
                size_or_type,
                first_member,
                member_count: all_members.len() as u32 - first_member,
                array,
            });
        }
        Ok(KernelBtf {
            types,
            members: all_members,
            strings: strings.to_vec(),
        })
    }

    /// The name at `offset` of the string section (empty when out of range).
    fn name(&self, offset: u32) -> &[u8] {
        let Some(rest) = self.strings.get(offset as usize..) else {
            return &[];
        };
        let end = rest.iter().position(|b| *b == 0).unwrap_or(rest.len());
        &rest[..end]
    }

    fn members_of(&self, t: &Type) -> &[Member] {
        let first = t.first_member as usize;
        self.members
            .get(first..first + t.member_count as usize)
            .unwrap_or(&[])
    }

    /// The first type named `name` that satisfies `wanted`.
    fn find_type(&self, name: &str, wanted: impl Fn(&Type) -> bool) -> Option<u32> {
        self.types
            .iter()
            .position(|t| t.name != 0 && wanted(t) && self.name(t.name) == name.as_bytes())
            .map(|id| id as u32)
    }

    fn get(&self, id: u32) -> Result<&Type, AgentError> {
        self.types
            .get(id as usize)
            .ok_or_else(|| btf_err(format!("type id {id} out of range")))
    }

    /// Follows typedefs and qualifiers to the underlying type.
    fn strip(&self, mut id: u32) -> Result<u32, AgentError> {
        for _ in 0..32 {
            let t = self.get(id)?;
            match t.kind {
                KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT | KIND_TYPE_TAG => {
                    id = t.size_or_type
                }
                _ => return Ok(id),
            }
        }
        Err(btf_err(format!("type chain too deep at id {id}")))
    }

    /// Size in bytes of a type.
    fn size_of(&self, id: u32) -> Result<u32, AgentError> {
        let id = self.strip(id)?;
        let t = self.get(id)?;
        Ok(match t.kind {
            KIND_PTR => 8,
            KIND_ARRAY => {
                let (elem, count) = t.array.unwrap_or((0, 0));
                self.size_of(elem)? * count
            }
            _ => t.size_or_type,
        })
    }

    fn struct_id(&self, name: &str) -> Result<u32, AgentError> {
        self.find_type(name, |t| t.kind == KIND_STRUCT && t.size_or_type > 0)
            .ok_or_else(|| btf_err(format!("no struct {name}")))
    }

    /// Finds `name` among the members of struct/union `id`, looking inside
    /// anonymous struct/union members; returns (bit offset, member type).
    fn find_member(&self, id: u32, name: &str) -> Result<Option<(u32, u32)>, AgentError> {
        let t = *self.get(self.strip(id)?)?;
        if t.kind != KIND_STRUCT && t.kind != KIND_UNION {
            return Ok(None);
        }
        for m in self.members_of(&t) {
            let member_name = self.name(m.name);
            if member_name == name.as_bytes() {
                if m.bitfield_size != 0 {
                    return Err(btf_err(format!("{name} is a bitfield")));
                }
                return Ok(Some((m.bit_offset, m.type_id)));
            }
            if member_name.is_empty() {
                if let Some((inner, ty)) = self.find_member(m.type_id, name)? {
                    return Ok(Some((m.bit_offset + inner, ty)));
                }
            }
        }
        Ok(None)
    }

    /// Byte offset and size of `path` (`se.sum_exec_runtime`) inside struct `outer`.
    pub fn field(&self, outer: &str, path: &str) -> Result<FieldOffset, AgentError> {
        let mut id = self.struct_id(outer)?;
        let mut bits = 0u32;
        for part in path.split('.') {
            let (offset, ty) = self
                .find_member(id, part)?
                .ok_or_else(|| btf_err(format!("struct {outer} has no member {path}")))?;
            bits += offset;
            id = ty;
        }
        if !bits.is_multiple_of(8) {
            return Err(btf_err(format!("{outer}.{path} is not byte-aligned")));
        }
        Ok(FieldOffset {
            offset: bits / 8,
            size: self.size_of(id)?,
        })
    }

    /// Like [`field`](Self::field), and checks the member's size.
    pub fn field_of_size(&self, outer: &str, path: &str, size: u32) -> Result<u32, AgentError> {
        let field = self.field(outer, path)?;
        if field.size != size {
            return Err(btf_err(format!(
                "{outer}.{path} is {} bytes, expected {size}",
                field.size
            )));
        }
        Ok(field.offset)
    }

    /// Byte offset of global variable `var` in data section `section` (for
    /// example `.data..percpu`) and its type's name; None when the kernel's
    /// BTF does not describe it.
    pub fn section_var(&self, section: &str, var: &str) -> Option<(u32, String)> {
        let id = self.find_type(section, |t| t.kind == KIND_DATASEC)?;
        let datasec = *self.get(id).ok()?;
        self.members_of(&datasec).iter().find_map(|entry| {
            let v = self.get(entry.type_id).ok()?;
            if v.kind != KIND_VAR || self.name(v.name) != var.as_bytes() {
                return None;
            }
            let ty = self.get(self.strip(v.size_or_type).ok()?).ok()?;
            let type_name = String::from_utf8_lossy(self.name(ty.name)).into_owned();
            Some((entry.bit_offset, type_name))
        })
    }

    /// Index of parameter `param` among a BTF tracepoint's arguments as the
    /// program's context sees them: the parameters of the kernel's
    /// `__bpf_trace_<name>` function (whose prototype names them) without its
    /// leading `void *__data`.
    pub fn tracepoint_arg(&self, tracepoint: &str, param: &str) -> Result<usize, AgentError> {
        let function = format!("__bpf_trace_{tracepoint}");
        let id = self
            .find_type(&function, |t| t.kind == KIND_FUNC)
            .ok_or_else(|| btf_err(format!("no tracepoint {tracepoint} ({function})")))?;
        let proto = *self.get(self.strip(self.get(id)?.size_or_type)?)?;
        if proto.kind != KIND_FUNC_PROTO {
            return Err(btf_err(format!("{function} has no prototype")));
        }
        self.members_of(&proto)
            .iter()
            .skip(1)
            .position(|p| self.name(p.name) == param.as_bytes())
            .ok_or_else(|| btf_err(format!("tracepoint {tracepoint} has no argument {param}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kernel() -> Option<KernelBtf> {
        let path = Path::new("/sys/kernel/btf/vmlinux");
        if !path.exists() {
            agent_common::privileged::record_skip(
                "sources::sched::btf::tests",
                &format!("this kernel has no BTF at {}", path.display()),
            );
            return None;
        }
        Some(KernelBtf::from_file(path).expect("the running kernel's BTF parses"))
    }

    #[test]
    fn task_struct_fields_of_the_running_kernel() {
        let Some(btf) = kernel() else { return };
        let se = btf.field("task_struct", "se").expect("se");
        let runtime_in_se = btf
            .field("sched_entity", "sum_exec_runtime")
            .expect("sum_exec_runtime");
        // Nested members add up.
        let runtime = btf
            .field("task_struct", "se.sum_exec_runtime")
            .expect("se.sum_exec_runtime");
        assert_eq!(runtime.offset, se.offset + runtime_in_se.offset);
        assert_eq!(runtime.size, 8);
        assert_eq!(btf.field("task_struct", "tgid").expect("tgid").size, 4);
        assert_eq!(btf.field("task_struct", "comm").expect("comm").size, 16);
        assert_eq!(
            btf.field("task_struct", "real_parent")
                .expect("parent")
                .size,
            8
        );
        assert!(btf.field("task_struct", "no_such_member").is_err());
        // pid and tgid are adjacent pid_t fields in every kernel with BTF.
        let pid = btf.field("task_struct", "pid").expect("pid");
        assert_eq!(
            btf.field("task_struct", "tgid").expect("tgid").offset,
            pid.offset + 4
        );
    }

    #[test]
    fn tracepoint_arguments_by_name() {
        let Some(btf) = kernel() else { return };
        let prev = btf.tracepoint_arg("sched_switch", "prev").expect("prev");
        let next = btf.tracepoint_arg("sched_switch", "next").expect("next");
        assert_eq!(next, prev + 1);
        assert_eq!(
            btf.tracepoint_arg("sched_process_fork", "child").ok(),
            Some(1)
        );
        assert!(btf.tracepoint_arg("sched_switch", "nothing").is_err());
    }

    #[test]
    fn per_cpu_variables_of_the_running_kernel() {
        let Some(btf) = kernel() else { return };
        let (rq, rq_type) = btf
            .section_var(".data..percpu", "runqueues")
            .expect("runqueues is a per-CPU variable");
        assert_eq!(rq_type, "rq");
        let rq_size = btf.field("rq", "nr_running").expect("rq.nr_running");
        assert!(rq_size.offset < 64, "nr_running leads struct rq");
        // Another per-CPU variable lies elsewhere in the same area.
        let (other, _) = btf
            .section_var(".data..percpu", "kernel_cpustat")
            .expect("kernel_cpustat");
        assert_ne!(rq, other);
        assert!(btf.section_var(".data..percpu", "no_such_var").is_none());
        assert!(btf.section_var(".no_such_section", "runqueues").is_none());
    }

    #[test]
    fn garbage_is_refused_with_a_reason() {
        let e = KernelBtf::parse(b"\x00\x01not btf").expect_err("bad magic");
        assert!(e.to_string().contains("magic"), "{e}");
    }
}
