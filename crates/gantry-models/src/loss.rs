//! GAN objectives on discriminator logits.
//!
//! `wgan-gp` is the Wasserstein critic objective; its gradient penalty needs the critic itself
//! and lives in [`crate::Gan`].
//!
//! BCE-from-logits is written with softplus: `BCE(l, 1) = softplus(-l)` and
//! `BCE(l, 0) = softplus(l)`, which is the same function without materialising target tensors.

use gantry_config::Loss;
use tch::Tensor;

/// The discriminator's loss on real and fake logits (each averaged over its batch).
pub fn discriminator(loss: Loss, real: &Tensor, fake: &Tensor) -> Tensor {
    match loss {
        Loss::Bce => (-real).softplus().mean(None) + fake.softplus().mean(None),
        Loss::Hinge => (-real + 1.0).relu().mean(None) + (fake + 1.0).relu().mean(None),
        Loss::WganGp => fake.mean(None) - real.mean(None),
    }
}

/// The generator's loss on the discriminator's logits for its images (non-saturating for BCE).
pub fn generator(loss: Loss, fake: &Tensor) -> Tensor {
    match loss {
        Loss::Bce => (-fake).softplus().mean(None),
        Loss::Hinge | Loss::WganGp => -fake.mean(None),
    }
}

#[cfg(test)]
mod tests {
    use tch::{Kind, Reduction};

    use super::*;

    #[test]
    fn bce_matches_libtorch_bce_with_logits() {
        let real = Tensor::from_slice(&[2.0f32, -1.0, 0.5, 30.0]);
        let fake = Tensor::from_slice(&[-3.0f32, 0.2, 1.0, -40.0]);
        let bce = |l: &Tensor, target: f64| {
            l.binary_cross_entropy_with_logits::<Tensor>(
                &l.full_like(target),
                None,
                None,
                Reduction::Mean,
            )
        };
        let want_d = bce(&real, 1.0) + bce(&fake, 0.0);
        let got_d = discriminator(Loss::Bce, &real, &fake);
        assert!((want_d.double_value(&[]) - got_d.double_value(&[])).abs() < 1e-6);
        let want_g = bce(&fake, 1.0).double_value(&[]);
        assert!((want_g - generator(Loss::Bce, &fake).double_value(&[])).abs() < 1e-6);
    }

    #[test]
    fn every_loss_is_finite_with_finite_gradients() {
        for loss in [Loss::Bce, Loss::Hinge, Loss::WganGp] {
            let real = Tensor::randn([16], (Kind::Float, tch::Device::Cpu)).set_requires_grad(true);
            let fake = (Tensor::randn([16], (Kind::Float, tch::Device::Cpu)) * 50.0)
                .set_requires_grad(true);
            let d = discriminator(loss, &real, &fake);
            let g = generator(loss, &fake);
            for value in [&d, &g] {
                assert!(value.double_value(&[]).is_finite(), "{loss}");
            }
            let grads = Tensor::run_backward(&[&d], &[&real, &fake], false, false);
            for grad in grads {
                assert!(bool::try_from(grad.isfinite().all()).unwrap(), "{loss}");
            }
        }
    }

    #[test]
    fn hinge_is_zero_when_margins_are_met() {
        let real = Tensor::from_slice(&[1.5f32, 2.0]);
        let fake = Tensor::from_slice(&[-1.5f32, -2.0]);
        assert_eq!(
            discriminator(Loss::Hinge, &real, &fake).double_value(&[]),
            0.0
        );
    }
}
