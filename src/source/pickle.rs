//! A pickle interpreter that never runs anything: it builds an inert tree of values and
//! knows a handful of callables by name (the ones a PyTorch state dict is made of),
//! which it evaluates itself. Every other global, and every construct that would
//! create or mutate an arbitrary object (INST, OBJ, NEWOBJ, EXT, BUILD on anything but
//! a dict, SETITEM on anything but a dict), is refused with its name and position.
//!
//! Memory is bounded by the pickle's length: every opcode adds at most one node, and
//! strings are copies of bytes of the pickle. The node count is capped as well.

use std::collections::HashMap;

use crate::dtype::Dtype;

/// Nodes allowed in one pickle (a 70B model's shard has a few thousand tensors, about
/// 20 nodes each).
const MAX_NODES: usize = 50_000_000;
/// Highest pickle protocol understood.
const MAX_PROTOCOL: u8 = 5;
/// Most dimensions a tensor may have (torch allows 64).
pub(crate) const MAX_RANK: usize = 64;

/// A node's index in the [`Tree`].
pub(crate) type Id = usize;

/// The callables a state dict may name, evaluated by the interpreter itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Callable {
    /// `collections.OrderedDict`: becomes a dict.
    OrderedDict,
    /// `torch._utils._rebuild_tensor_v2(storage, offset, size, stride, requires_grad, hooks[, metadata])`.
    RebuildTensorV2,
    /// `torch._utils._rebuild_tensor(storage, offset, size, stride)`.
    RebuildTensor,
    /// `torch._utils._rebuild_parameter(data, requires_grad, hooks)`: the tensor.
    RebuildParameter,
    /// `torch._utils._rebuild_parameter_with_state(data, requires_grad, hooks, state)`.
    RebuildParameterWithState,
    /// `torch.Size(tuple)`: the tuple.
    TorchSize,
    /// A `torch.*Storage` class: only named in persistent ids, never called.
    Storage(Dtype),
}

impl Callable {
    fn name(self) -> &'static str {
        match self {
            Callable::OrderedDict => "collections.OrderedDict",
            Callable::RebuildTensorV2 => "torch._utils._rebuild_tensor_v2",
            Callable::RebuildTensor => "torch._utils._rebuild_tensor",
            Callable::RebuildParameter => "torch._utils._rebuild_parameter",
            Callable::RebuildParameterWithState => "torch._utils._rebuild_parameter_with_state",
            Callable::TorchSize => "torch.Size",
            Callable::Storage(_) => "torch storage class",
        }
    }
}

/// The storage classes of the dtypes the weight format holds.
const STORAGES: &[(&str, Dtype)] = &[
    ("FloatStorage", Dtype::F32),
    ("HalfStorage", Dtype::F16),
    ("BFloat16Storage", Dtype::Bf16),
    ("DoubleStorage", Dtype::F64),
    ("LongStorage", Dtype::I64),
    ("IntStorage", Dtype::I32),
    ("ShortStorage", Dtype::I16),
    ("CharStorage", Dtype::I8),
    ("ByteStorage", Dtype::U8),
    ("BoolStorage", Dtype::Bool),
];

/// The allowlist: what `module.name` may be, and nothing else.
fn lookup(module: &str, name: &str) -> Option<Callable> {
    Some(match (module, name) {
        ("collections", "OrderedDict") => Callable::OrderedDict,
        ("torch._utils", "_rebuild_tensor_v2") => Callable::RebuildTensorV2,
        ("torch._utils", "_rebuild_tensor") => Callable::RebuildTensor,
        ("torch._utils", "_rebuild_parameter") => Callable::RebuildParameter,
        ("torch._utils", "_rebuild_parameter_with_state") => Callable::RebuildParameterWithState,
        ("torch", "Size") => Callable::TorchSize,
        ("torch", s) => STORAGES
            .iter()
            .find(|(n, _)| *n == s)
            .map(|&(_, d)| Callable::Storage(d))?,
        _ => return None,
    })
}

/// Why a pickle was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum PickleError {
    /// Malformed or beyond a limit, at a byte position.
    Invalid { position: u64, reason: String },
    /// A global outside the allowlist.
    Forbidden { position: u64, global: String },
    /// A class of a pickled module (`torch.nn.*`, `transformers.*`, `__main__.*`).
    Module { global: String },
}

/// One value of the inert tree.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Node {
    None,
    Bool(bool),
    Int(i64),
    /// An integer too large for i64, little-endian two's complement.
    BigInt(Vec<u8>),
    Float(f64),
    Str(String),
    Bytes(Vec<u8>),
    Tuple(Vec<Id>),
    List(Vec<Id>),
    Dict(Vec<(Id, Id)>),
    Callable(Callable),
    /// A persistent id: the object it names (a storage's description tuple).
    PersId(Id),
    /// A tensor rebuilt by `_rebuild_tensor(_v2)`: `(storage, offset, size, stride)`.
    Tensor {
        storage: Id,
        offset: Id,
        size: Id,
        stride: Id,
    },
}

impl Node {
    fn kind(&self) -> &'static str {
        match self {
            Node::None => "None",
            Node::Bool(_) => "a bool",
            Node::Int(_) | Node::BigInt(_) => "an int",
            Node::Float(_) => "a float",
            Node::Str(_) => "a string",
            Node::Bytes(_) => "bytes",
            Node::Tuple(_) => "a tuple",
            Node::List(_) => "a list",
            Node::Dict(_) => "a dict",
            Node::Callable(_) => "a class or function",
            Node::PersId(_) => "a persistent id",
            Node::Tensor { .. } => "a tensor",
        }
    }
}

/// The values a pickle built, and the root it returned.
#[derive(Debug, Default)]
pub(crate) struct Tree {
    nodes: Vec<Node>,
}

impl Tree {
    /// Values built.
    pub(crate) fn len(&self) -> usize {
        self.nodes.len()
    }

    pub(crate) fn get(&self, id: Id) -> &Node {
        // Ids are only made by `push`.
        &self.nodes[id]
    }

    /// What the node is, for messages.
    pub(crate) fn kind(&self, id: Id) -> &'static str {
        self.get(id).kind()
    }

    fn push(&mut self, n: Node, at: usize) -> Result<Id, PickleError> {
        if self.nodes.len() >= MAX_NODES {
            return Err(invalid(at, format!("more than {MAX_NODES} values")));
        }
        self.nodes.push(n);
        Ok(self.nodes.len() - 1)
    }
}

fn invalid(at: usize, reason: impl Into<String>) -> PickleError {
    PickleError::Invalid {
        position: at as u64,
        reason: reason.into(),
    }
}

/// Classes that mean "a pickled model, not a state dict".
fn is_module_class(module: &str) -> bool {
    module.starts_with("torch.nn")
        || module.starts_with("transformers")
        || module == "__main__"
        || module.starts_with("timm")
        || module.starts_with("torchvision.models")
}

/// The interpreter's state over one pickle.
struct Machine<'a> {
    data: &'a [u8],
    pos: usize,
    tree: Tree,
    stack: Vec<Id>,
    marks: Vec<usize>,
    memo: HashMap<u64, Id>,
}

/// Runs the pickle that starts at `start` in `data` (inertly) and returns the tree, its
/// root and the position just after its STOP.
pub(crate) fn load(data: &[u8], start: usize) -> Result<(Tree, Id, usize), PickleError> {
    let mut m = Machine {
        data,
        pos: start,
        tree: Tree::default(),
        stack: Vec::new(),
        marks: Vec::new(),
        memo: HashMap::new(),
    };
    let root = m.run()?;
    Ok((m.tree, root, m.pos))
}

impl Machine<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8], PickleError> {
        let at = self.pos;
        let end = at
            .checked_add(n)
            .filter(|&e| e <= self.data.len())
            .ok_or_else(|| invalid(at, "the pickle ends early"))?;
        self.pos = end;
        Ok(&self.data[at..end])
    }

    fn u8(&mut self) -> Result<u8, PickleError> {
        Ok(self.take(1)?[0])
    }

    fn le<const N: usize>(&mut self) -> Result<[u8; N], PickleError> {
        let mut b = [0u8; N];
        b.copy_from_slice(self.take(N)?);
        Ok(b)
    }

    fn len32(&mut self) -> Result<usize, PickleError> {
        Ok(u32::from_le_bytes(self.le()?) as usize)
    }

    fn len64(&mut self, at: usize) -> Result<usize, PickleError> {
        usize::try_from(u64::from_le_bytes(self.le()?)).map_err(|_| invalid(at, "length too large"))
    }

    fn line(&mut self) -> Result<&str, PickleError> {
        let at = self.pos;
        let rest = self.data.get(at..).unwrap_or(&[]);
        let n = rest
            .iter()
            .position(|&b| b == b'\n')
            .ok_or_else(|| invalid(at, "the pickle ends early (no end of line)"))?;
        self.pos = at + n + 1;
        std::str::from_utf8(&rest[..n]).map_err(|_| invalid(at, "a text argument is not UTF-8"))
    }

    fn string(&mut self, n: usize, at: usize) -> Result<Node, PickleError> {
        let b = self.take(n)?;
        std::str::from_utf8(b)
            .map(|s| Node::Str(s.to_string()))
            .map_err(|_| invalid(at, "a string is not UTF-8"))
    }

    fn push(&mut self, n: Node, at: usize) -> Result<(), PickleError> {
        let id = self.tree.push(n, at)?;
        self.stack.push(id);
        Ok(())
    }

    fn pop(&mut self, at: usize) -> Result<Id, PickleError> {
        let floor = self.marks.last().copied().unwrap_or(0);
        if self.stack.len() <= floor {
            return Err(invalid(at, "stack underflow"));
        }
        self.stack
            .pop()
            .ok_or_else(|| invalid(at, "stack underflow"))
    }

    fn top(&self, at: usize) -> Result<Id, PickleError> {
        let floor = self.marks.last().copied().unwrap_or(0);
        if self.stack.len() <= floor {
            return Err(invalid(at, "stack underflow"));
        }
        self.stack
            .last()
            .copied()
            .ok_or_else(|| invalid(at, "stack underflow"))
    }

    /// Pops everything down to the last MARK.
    fn pop_mark(&mut self, at: usize) -> Result<Vec<Id>, PickleError> {
        let m = self
            .marks
            .pop()
            .ok_or_else(|| invalid(at, "no MARK to pop to"))?;
        Ok(self.stack.split_off(m))
    }

    fn global(&mut self, module: &str, name: &str, at: usize) -> Result<(), PickleError> {
        match lookup(module, name) {
            Some(c) => self.push(Node::Callable(c), at),
            None if is_module_class(module) => Err(PickleError::Module {
                global: format!("{module}.{name}"),
            }),
            None => Err(PickleError::Forbidden {
                position: at as u64,
                global: format!("{module}.{name}"),
            }),
        }
    }

    fn memo_put(&mut self, key: u64, at: usize) -> Result<(), PickleError> {
        let id = self.top(at)?;
        self.memo.insert(key, id);
        Ok(())
    }

    fn memo_get(&mut self, key: u64, at: usize) -> Result<(), PickleError> {
        let id = *self
            .memo
            .get(&key)
            .ok_or_else(|| invalid(at, format!("memo key {key} was never stored")))?;
        self.stack.push(id);
        Ok(())
    }

    fn set_items(&mut self, target: Id, items: Vec<Id>, at: usize) -> Result<(), PickleError> {
        if !items.len().is_multiple_of(2) {
            return Err(invalid(at, "SETITEMS with an odd number of values"));
        }
        match &mut self.tree.nodes[target] {
            Node::Dict(d) => {
                d.extend(items.chunks_exact(2).map(|kv| (kv[0], kv[1])));
                Ok(())
            }
            other => Err(invalid(
                at,
                format!("SETITEM on {}, which is not a dict", other.kind()),
            )),
        }
    }

    fn append(&mut self, target: Id, items: Vec<Id>, at: usize) -> Result<(), PickleError> {
        match &mut self.tree.nodes[target] {
            Node::List(l) => {
                l.extend(items);
                Ok(())
            }
            other => Err(invalid(
                at,
                format!("APPEND on {}, which is not a list", other.kind()),
            )),
        }
    }

    /// REDUCE: the interpreter evaluates the few callables it knows, inertly.
    fn reduce(&mut self, func: Id, args: Id, at: usize) -> Result<Node, PickleError> {
        let Node::Callable(c) = *self.tree.get(func) else {
            return Err(invalid(
                at,
                format!(
                    "REDUCE calls {}, not an allowed function",
                    self.tree.kind(func)
                ),
            ));
        };
        let Node::Tuple(a) = self.tree.get(args).clone() else {
            return Err(invalid(
                at,
                format!("REDUCE of `{}` without an argument tuple", c.name()),
            ));
        };
        let arity = |ok: &[usize]| {
            if ok.contains(&a.len()) {
                Ok(())
            } else {
                Err(invalid(
                    at,
                    format!("`{}` called with {} arguments", c.name(), a.len()),
                ))
            }
        };
        match c {
            Callable::OrderedDict => {
                arity(&[0])?;
                Ok(Node::Dict(Vec::new()))
            }
            Callable::RebuildTensorV2 | Callable::RebuildTensor => {
                arity(if c == Callable::RebuildTensor {
                    &[4]
                } else {
                    &[6, 7]
                })?;
                Ok(Node::Tensor {
                    storage: a[0],
                    offset: a[1],
                    size: a[2],
                    stride: a[3],
                })
            }
            Callable::RebuildParameter | Callable::RebuildParameterWithState => {
                arity(if c == Callable::RebuildParameter {
                    &[3]
                } else {
                    &[4]
                })?;
                match self.tree.get(a[0]) {
                    t @ Node::Tensor { .. } => Ok(t.clone()),
                    other => Err(invalid(
                        at,
                        format!("`{}` of {}, not a tensor", c.name(), other.kind()),
                    )),
                }
            }
            Callable::TorchSize => {
                arity(&[1])?;
                match self.tree.get(a[0]) {
                    Node::Tuple(t) if t.len() <= MAX_RANK => Ok(Node::Tuple(t.clone())),
                    Node::Tuple(t) => Err(invalid(
                        at,
                        format!(
                            "`torch.Size` of {} dimensions (at most {MAX_RANK})",
                            t.len()
                        ),
                    )),
                    other => Err(invalid(at, format!("`torch.Size` of {}", other.kind()))),
                }
            }
            Callable::Storage(_) => Err(invalid(
                at,
                "a storage class is called: storages come only from persistent ids",
            )),
        }
    }

    fn run(&mut self) -> Result<Id, PickleError> {
        loop {
            let at = self.pos;
            let op = self.u8()?;
            match op {
                0x80 => {
                    let p = self.u8()?;
                    if p > MAX_PROTOCOL {
                        return Err(invalid(
                            at,
                            format!("pickle protocol {p} is not supported (0 to {MAX_PROTOCOL})"),
                        ));
                    }
                }
                0x95 => {
                    self.le::<8>()?; // FRAME: a length hint only
                }
                b'.' => {
                    let root = self.pop(at)?;
                    return Ok(root);
                }
                b'(' => self.marks.push(self.stack.len()),
                b'0' => {
                    self.pop(at)?;
                }
                b'1' => {
                    self.pop_mark(at)?;
                }
                b'2' => {
                    let t = self.top(at)?;
                    self.stack.push(t);
                }
                b'N' => self.push(Node::None, at)?,
                0x88 => self.push(Node::Bool(true), at)?,
                0x89 => self.push(Node::Bool(false), at)?,
                b'J' => {
                    let v = i32::from_le_bytes(self.le()?);
                    self.push(Node::Int(v.into()), at)?
                }
                b'K' => {
                    let v = self.u8()?;
                    self.push(Node::Int(v.into()), at)?
                }
                b'M' => {
                    let v = u16::from_le_bytes(self.le()?);
                    self.push(Node::Int(v.into()), at)?
                }
                0x8a | 0x8b => {
                    let n = if op == 0x8a {
                        self.u8()? as usize
                    } else {
                        self.len32()?
                    };
                    let b = self.take(n)?.to_vec();
                    let node = if b.len() <= 8 {
                        let neg = b.last().is_some_and(|&x| x & 0x80 != 0);
                        let mut w = [if neg { 0xff } else { 0 }; 8];
                        w[..b.len()].copy_from_slice(&b);
                        Node::Int(i64::from_le_bytes(w))
                    } else {
                        Node::BigInt(b)
                    };
                    self.push(node, at)?
                }
                b'I' | b'L' => {
                    let text = self.line()?.trim_end_matches('L').to_string();
                    let node = match text.as_str() {
                        "00" => Node::Bool(false),
                        "01" => Node::Bool(true),
                        t => Node::Int(
                            t.parse()
                                .map_err(|_| invalid(at, format!("integer `{t}` out of range")))?,
                        ),
                    };
                    self.push(node, at)?
                }
                b'G' => {
                    let v = f64::from_be_bytes(self.le()?);
                    self.push(Node::Float(v), at)?
                }
                b'X' => {
                    let n = self.len32()?;
                    let s = self.string(n, at)?;
                    self.push(s, at)?
                }
                0x8c => {
                    let n = self.u8()? as usize;
                    let s = self.string(n, at)?;
                    self.push(s, at)?
                }
                0x8d => {
                    let n = self.len64(at)?;
                    let s = self.string(n, at)?;
                    self.push(s, at)?
                }
                b'C' | b'U' => {
                    let n = self.u8()? as usize;
                    let b = self.take(n)?.to_vec();
                    self.push(Node::Bytes(b), at)?
                }
                b'B' | b'T' => {
                    let n = self.len32()?;
                    let b = self.take(n)?.to_vec();
                    self.push(Node::Bytes(b), at)?
                }
                0x8e | 0x96 => {
                    let n = self.len64(at)?;
                    let b = self.take(n)?.to_vec();
                    self.push(Node::Bytes(b), at)?
                }
                b')' => self.push(Node::Tuple(Vec::new()), at)?,
                b']' => self.push(Node::List(Vec::new()), at)?,
                b'}' => self.push(Node::Dict(Vec::new()), at)?,
                0x8f => self.push(Node::List(Vec::new()), at)?,
                b't' => {
                    let items = self.pop_mark(at)?;
                    self.push(Node::Tuple(items), at)?
                }
                0x85..=0x87 => {
                    let n = (op - 0x84) as usize;
                    let mut items = Vec::with_capacity(n);
                    for _ in 0..n {
                        items.push(self.pop(at)?);
                    }
                    items.reverse();
                    self.push(Node::Tuple(items), at)?
                }
                b'l' => {
                    let items = self.pop_mark(at)?;
                    self.push(Node::List(items), at)?
                }
                0x91 => {
                    let items = self.pop_mark(at)?;
                    self.push(Node::List(items), at)?
                }
                b'd' => {
                    let items = self.pop_mark(at)?;
                    let id = self.tree.push(Node::Dict(Vec::new()), at)?;
                    self.set_items(id, items, at)?;
                    self.stack.push(id);
                }
                b'a' => {
                    let v = self.pop(at)?;
                    let l = self.top(at)?;
                    self.append(l, vec![v], at)?;
                }
                b'e' | 0x90 => {
                    let items = self.pop_mark(at)?;
                    let l = self.top(at)?;
                    self.append(l, items, at)?;
                }
                b's' => {
                    let v = self.pop(at)?;
                    let k = self.pop(at)?;
                    let d = self.top(at)?;
                    self.set_items(d, vec![k, v], at)?;
                }
                b'u' => {
                    let items = self.pop_mark(at)?;
                    let d = self.top(at)?;
                    self.set_items(d, items, at)?;
                }
                b'q' => {
                    let k = self.u8()?;
                    self.memo_put(k.into(), at)?
                }
                b'r' => {
                    let k = u32::from_le_bytes(self.le()?);
                    self.memo_put(k.into(), at)?
                }
                b'p' => {
                    let k = self
                        .line()?
                        .parse()
                        .map_err(|_| invalid(at, "bad PUT key"))?;
                    self.memo_put(k, at)?
                }
                0x94 => {
                    let k = self.memo.len() as u64;
                    self.memo_put(k, at)?
                }
                b'h' => {
                    let k = self.u8()?;
                    self.memo_get(k.into(), at)?
                }
                b'j' => {
                    let k = u32::from_le_bytes(self.le()?);
                    self.memo_get(k.into(), at)?
                }
                b'g' => {
                    let k = self
                        .line()?
                        .parse()
                        .map_err(|_| invalid(at, "bad GET key"))?;
                    self.memo_get(k, at)?
                }
                b'c' => {
                    let module = self.line()?.to_string();
                    let name = self.line()?.to_string();
                    self.global(&module, &name, at)?
                }
                0x93 => {
                    let name = self.pop(at)?;
                    let module = self.pop(at)?;
                    match (self.tree.get(module), self.tree.get(name)) {
                        (Node::Str(m), Node::Str(n)) => {
                            let (m, n) = (m.clone(), n.clone());
                            self.global(&m, &n, at)?
                        }
                        _ => {
                            return Err(invalid(at, "STACK_GLOBAL of values that are not strings"))
                        }
                    }
                }
                b'Q' => {
                    let pid = self.pop(at)?;
                    self.push(Node::PersId(pid), at)?
                }
                b'P' => {
                    let s = self.line()?.to_string();
                    let id = self.tree.push(Node::Str(s), at)?;
                    self.push(Node::PersId(id), at)?
                }
                b'R' => {
                    let args = self.pop(at)?;
                    let func = self.pop(at)?;
                    let node = self.reduce(func, args, at)?;
                    self.push(node, at)?
                }
                b'b' => {
                    // BUILD sets an object's state: only a dict's (an OrderedDict's
                    // `_metadata`) is accepted, and ignored.
                    let state = self.pop(at)?;
                    let obj = self.top(at)?;
                    match (self.tree.get(obj), self.tree.get(state)) {
                        (Node::Dict(_), Node::Dict(_) | Node::None) => {}
                        (o, _) => {
                            return Err(invalid(
                                at,
                                format!(
                                    "BUILD (set the state of) {}, which a state dict never does",
                                    o.kind()
                                ),
                            ))
                        }
                    }
                }
                b'i' | b'o' | 0x81 | 0x92 | 0x82..=0x84 | 0x97 | 0x98 => {
                    let name = match op {
                        b'i' => "INST",
                        b'o' => "OBJ",
                        0x81 => "NEWOBJ",
                        0x92 => "NEWOBJ_EX",
                        0x97 => "NEXT_BUFFER",
                        0x98 => "READONLY_BUFFER",
                        _ => "EXT",
                    };
                    return Err(invalid(
                        at,
                        format!("opcode {name} (object construction or extension) is not part of a state dict"),
                    ));
                }
                b'F' | b'S' | b'V' => {
                    return Err(invalid(
                        at,
                        format!("text opcode `{}` is not supported", op as char),
                    ))
                }
                other => return Err(invalid(at, format!("unknown opcode 0x{other:02x}"))),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(p: &[u8]) -> PickleError {
        load(p, 0).unwrap_err()
    }

    #[test]
    fn inert_values_and_memo() {
        // {'a': [1, 'x'], 'b': <memo of the list>}
        let p = b"\x80\x02}q\x00(X\x01\x00\x00\x00a]q\x01(K\x01X\x01\x00\x00\x00xeX\x01\x00\x00\x00bh\x01u.";
        let (t, root, end) = load(p, 0).unwrap();
        assert_eq!(end, p.len());
        let Node::Dict(d) = t.get(root) else { panic!() };
        assert_eq!(d.len(), 2);
        assert_eq!(d[0].1, d[1].1, "the memo gives the same node");
        let Node::List(l) = t.get(d[0].1) else {
            panic!()
        };
        assert_eq!(t.get(l[0]), &Node::Int(1));
    }

    #[test]
    fn refusals_name_the_construct() {
        assert_eq!(
            err(b"\x80\x02cposix\nsystem\nX\x02\x00\x00\x00ls\x85R."),
            PickleError::Forbidden {
                position: 2,
                global: "posix.system".into()
            }
        );
        assert_eq!(
            err(b"\x80\x02ctorch.nn.modules.linear\nLinear\n)\x81."),
            PickleError::Module {
                global: "torch.nn.modules.linear.Linear".into()
            }
        );
        let msg = |e: PickleError| match e {
            PickleError::Invalid { position, reason } => format!("{position}: {reason}"),
            e => panic!("{e:?}"),
        };
        assert_eq!(msg(err(b"\x80\x02K\x01")), "4: the pickle ends early");
        assert_eq!(
            msg(err(b"\x80\x09.")),
            "0: pickle protocol 9 is not supported (0 to 5)"
        );
        assert_eq!(msg(err(b"\x80\x02\xff")), "2: unknown opcode 0xff");
        assert_eq!(
            msg(err(b"\x80\x02h\x07.")),
            "2: memo key 7 was never stored"
        );
        assert_eq!(msg(err(b"\x80\x02.")), "2: stack underflow");
        // SETITEM on a list (CVE-2026-24747's shape) and BUILD on a non-dict.
        assert_eq!(
            msg(err(b"\x80\x02]K\x01K\x02s.")),
            "7: SETITEM on a list, which is not a dict"
        );
        assert_eq!(
            msg(err(b"\x80\x02]}b.")),
            "4: BUILD (set the state of) a list, which a state dict never does"
        );
        assert_eq!(
            msg(err(b"\x80\x02ctorch\nFloatStorage\n)R.")),
            "23: a storage class is called: storages come only from persistent ids"
        );
        assert_eq!(
            msg(err(b"\x80\x02(i__main__\nX\n.")),
            "3: opcode INST (object construction or extension) is not part of a state dict"
        );
    }
}
