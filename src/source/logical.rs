//! The tensors a conversion takes ([`Logical`]): each stored tensor, or a dequantized
//! weight in its main tensor's place, and what the scheme consumes or drops.

use super::{Dequantized, Role, Source, TensorInfo, TensorRef};

/// A tensor as a conversion sees it: stored, or dequantized from several stored ones.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Logical<'a> {
    /// Where it stands in source order (the stored tensor, or the dequantized one's
    /// main tensor).
    pub(crate) at: TensorRef,
    /// Its name, dtype and shape (a dequantized one's: F32 values of the output shape).
    pub(crate) info: &'a TensorInfo,
    /// How it is dequantized, if it is.
    pub(crate) dequant: Option<&'a Dequantized>,
}

/// What [`Source::logical`] leaves out, and why.
#[derive(Debug, Clone, Default)]
pub(crate) struct Consumed {
    /// `(stored name, dequantized name)` of the scales, zeros and indices consumed.
    pub(crate) consumed: Vec<(String, String)>,
    /// `(stored name, reason)` of the tensors the scheme does not need.
    pub(crate) dropped: Vec<(String, String)>,
}

impl Source {
    /// The tensors a conversion takes, in source order: with `dequantize` (unless
    /// `--keep-quantized`), each quantized weight of the scheme once, dequantized, in
    /// its main tensor's place, its scales and zeros consumed and activation scales
    /// dropped; otherwise every stored tensor as it is.
    pub(crate) fn logical(&self, dequantize: bool) -> (Vec<Logical<'_>>, Consumed) {
        let mut out = Vec::new();
        let mut gone = Consumed::default();
        let scheme = self.scheme.as_ref().filter(|_| dequantize);
        for (s, shard) in self.shards.iter().enumerate() {
            for (t, info) in shard.header.tensors.iter().enumerate() {
                let at = TensorRef {
                    shard: s,
                    tensor: t,
                };
                match scheme.and_then(|sc| sc.roles.get(&at).map(|r| (sc, r))) {
                    None => out.push(Logical {
                        at,
                        info,
                        dequant: None,
                    }),
                    Some((sc, Role::Main(i))) => {
                        let d = &sc.tensors[*i];
                        out.push(Logical {
                            at,
                            info: &d.info,
                            dequant: Some(d),
                        })
                    }
                    Some((sc, Role::Consumed(i))) => gone
                        .consumed
                        .push((info.name.clone(), sc.tensors[*i].name.clone())),
                    Some((_, Role::Dropped(why))) => {
                        gone.dropped.push((info.name.clone(), why.clone()))
                    }
                }
            }
        }
        (out, gone)
    }

    /// The dequantized weight whose main tensor is `at`, when `dequantize` is on and
    /// the scheme has one there.
    pub(crate) fn dequantized_at(&self, at: TensorRef, dequantize: bool) -> Option<&Dequantized> {
        let sc = self.scheme.as_ref().filter(|_| dequantize)?;
        match sc.roles.get(&at)? {
            Role::Main(i) => sc.tensors.get(*i),
            _ => None,
        }
    }
}
