//! A network's trainable parameters as views into one flat tensor.

use tch::{Kind, Tensor, nn::VarStore};

/// The trainable parameters of one `VarStore`, re-pointed to views of a single contiguous
/// tensor. Gradients are flattened into the same layout, so one all-reduce and one fused
/// optimiser pass cover the whole network, with no per-tensor packing and unpacking.
#[derive(Debug)]
pub struct FlatParams {
    /// Parameter names in layout order (sorted, so every rank agrees).
    pub names: Vec<String>,
    /// The parameters themselves (shallow handles sharing the VarStore's tensors).
    pub tensors: Vec<Tensor>,
    /// All parameters, concatenated; updating it in place updates the network.
    pub flat: Tensor,
}

impl FlatParams {
    pub fn new(vs: &VarStore) -> Self {
        let mut named: Vec<(String, Tensor)> = vs
            .variables()
            .into_iter()
            .filter(|(_, t)| t.requires_grad())
            .collect();
        named.sort_by(|a, b| a.0.cmp(&b.0));
        let flat = tch::no_grad(|| {
            let pieces: Vec<Tensor> = named.iter().map(|(_, t)| t.reshape([-1])).collect();
            Tensor::cat(&pieces, 0)
        });
        let mut offset = 0;
        for (_, tensor) in &mut named {
            let numel = i64::try_from(tensor.numel()).unwrap_or(i64::MAX);
            let view = flat.narrow(0, offset, numel).view(tensor.size().as_slice());
            tensor.set_data(&view);
            offset += numel;
        }
        let (names, tensors) = named.into_iter().unzip();
        Self {
            names,
            tensors,
            flat,
        }
    }

    pub fn numel(&self) -> usize {
        self.flat.numel()
    }

    /// Concatenates per-parameter gradients (in `tensors` order) into `out` (`numel()`
    /// elements of the parameters' kind), without allocating. A parameter that got no
    /// gradient contributes zeros.
    pub fn flatten_grads_into(&self, grads: &[Tensor], out: &Tensor) {
        let pieces: Vec<Tensor> = grads
            .iter()
            .zip(&self.tensors)
            .map(|(g, p)| {
                if g.defined() {
                    g.reshape([-1])
                } else {
                    p.zeros_like().reshape([-1])
                }
            })
            .collect();
        let _ = Tensor::cat_out(out, &pieces, 0);
    }

    /// (name, shape, kind) of every parameter, to check that ranks built the same network.
    pub fn signature(&self) -> Vec<(String, Vec<i64>, Kind)> {
        self.names
            .iter()
            .zip(&self.tensors)
            .map(|(n, t)| (n.clone(), t.size(), t.kind()))
            .collect()
    }
}
