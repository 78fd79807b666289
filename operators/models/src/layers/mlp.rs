//! The gated MLP: `down(act(gate(x)) * up(x))`, the activation (and in training its
//! backward) through arenaflow's GPU kernels where they run, candle's ops otherwise.

use candle_core::Tensor;

use crate::error::Result;
use crate::lora::Projection;
use crate::models::{Activation, DecoderConfig};
use crate::profile;
use crate::weights::Weights;

use super::linear::Linear;
use super::Kernels;

#[derive(Debug, Clone)]
pub struct Mlp {
    pub gate: Linear,
    pub up: Linear,
    pub down: Linear,
    activation: Activation,
    /// arenaflow's GPU kernels for the activation and its backward.
    fused: bool,
}

impl Mlp {
    /// `gate_proj`, `up_proj` and `down_proj` under `vb` (the layer's `mlp`).
    pub fn new(cfg: &DecoderConfig, vb: &Weights, kernels: Kernels) -> Result<Self> {
        let (h, i, bias) = (cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias);
        Ok(Self {
            gate: Linear::new(&vb.pp(Projection::Gate.module_name()), i, h, bias)?,
            up: Linear::new(&vb.pp(Projection::Up.module_name()), i, h, bias)?,
            down: Linear::new(&vb.pp(Projection::Down.module_name()), h, i, bias)?,
            activation: cfg.activation,
            fused: kernels.gpu,
        })
    }

    pub fn forward_t(&self, xs: &Tensor, train: bool) -> Result<Tensor> {
        let dev = xs.device();
        let (gate, up) = profile::time(dev, "mlp projections", || {
            Ok((
                self.gate.forward_t(xs, train)?,
                self.up.forward_t(xs, train)?,
            ))
        })?;
        let h = profile::time(dev, "activation", || self.activate(&gate, &up, train))?;
        profile::time(dev, "mlp projections", || {
            Ok(self.down.forward_t(&h, train)?)
        })
    }

    fn activate(&self, gate: &Tensor, up: &Tensor, train: bool) -> Result<Tensor> {
        if self.fused {
            let fused = if train {
                crate::ops::gated::gated_t
            } else {
                crate::ops::gated::gated
            };
            return Ok(fused(gate, up, self.activation)?);
        }
        let gate = match self.activation {
            Activation::Silu => candle_nn::ops::silu(gate)?,
            Activation::GeluTanh => gate.gelu()?,
            Activation::GeluErf => gate.gelu_erf()?,
        };
        Ok((gate * up)?)
    }
}
