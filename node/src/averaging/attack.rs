//! [`Attack`]: fault injection for tests and testnets, so that what a hostile peer can do to
//! averaging is tried with real nodes. A node given an attack (hidden flag
//! `--attack-averaging`) speaks the protocol correctly but lies in what it sends: the attacks
//! an adversarial peer found (see the security model in the README). Pure functions: the
//! behaviour asks what to send instead of its own parameters.

use std::str::FromStr;

use p2p_models::params::dot;

use super::pieces::PieceCodec;

/// How a hostile node lies in averaging sessions.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Attack {
    /// All parameters NaN.
    Nan,
    /// The partner's own parameters negated (relative distance exactly 2 from them); in
    /// sessions it opens, its own negated.
    Negate,
    /// Its parameters times this factor.
    Scale(f32),
    /// A vector at this cosine with the partner's (with outer steps: its pseudo-gradient; its
    /// own where the partner's is not received yet) and [`OPPOSE_NORM`] times its norm: with
    /// a cosine just above the guards' refusal bound (`MIN_COSINE`, -0.9) and a norm just
    /// under their clipping (1.5 times the reference), it cancels as much of the partner's
    /// own progress as the guards let through. Against an adaptive outer rate (FedExP), which
    /// grows as a round's pseudo-gradients cancel, this is the strongest lie they accept.
    Oppose(f64),
    /// Its parameters plus Gaussian noise of this relative norm.
    Noise(f64),
    /// [`Attack::Negate`], claiming this many samples seen (to take the mixing weight).
    Claim(u64),
    /// Accepts and opens sessions and never finishes them: pieces asked of it are never
    /// answered, and sessions it opens get no pieces.
    Stall,
}

impl FromStr for Attack {
    type Err = String;

    /// `nan`, `negate`, `scale=F`, `noise=D`, `oppose=C` (C in [-1, 1]), `claim=N` or
    /// `stall`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (kind, arg) = s.split_once('=').unwrap_or((s, ""));
        let number = |what: &str| {
            arg.parse::<f64>()
                .ok()
                .filter(|v| v.is_finite())
                .ok_or_else(|| format!("{kind} needs a number ({what}): {kind}=…"))
        };
        Ok(match kind {
            "nan" => Self::Nan,
            "negate" => Self::Negate,
            "scale" => Self::Scale(number("the factor")? as f32),
            "noise" => Self::Noise(number("the relative norm")?),
            "oppose" => {
                let cosine = number("the cosine")?;
                if !(-1.0..=1.0).contains(&cosine) {
                    return Err(format!("oppose={cosine}: a cosine is in [-1, 1]"));
                }
                Self::Oppose(cosine)
            }
            "claim" => Self::Claim(number("the samples claimed")? as u64),
            "stall" => Self::Stall,
            _ => {
                return Err(format!(
                    "unknown attack {kind:?}: nan, negate, scale=F, noise=D, oppose=C, claim=N \
                     or stall"
                ))
            }
        })
    }
}

impl Attack {
    /// The samples claimed in `Open` and `Accepted` instead of the true `samples`.
    pub fn claimed_samples(self, samples: u64) -> u64 {
        match self {
            Self::Claim(n) => n,
            _ => samples,
        }
    }

    /// Whether, with outer steps, this attack sends its outer parameters honestly and lies
    /// only in its pseudo-gradient: negation and scaling do, so that the outer parameters pass
    /// their checks and only the pseudo-gradient checks stand between the lie and the model.
    pub fn honest_outer_parameters(self) -> bool {
        matches!(
            self,
            Self::Negate | Self::Scale(_) | Self::Claim(_) | Self::Oppose(_)
        )
    }

    /// What to send instead of `own` (this piece of our parameters); `partner` is the same
    /// piece of the partner's parameters when already received, `own_norm` and `total` the
    /// L2 norm and length of all we exchange (our parameters; with outer steps, our
    /// pseudo-gradient followed by our outer parameters, which only the attacks that are not
    /// [`Attack::honest_outer_parameters`] lie about), encoded as `codec` says for piece
    /// `index`.
    pub fn piece(
        self,
        own: &[f32],
        partner: Option<&[f32]>,
        own_norm: f64,
        total: usize,
        (codec, index): (&PieceCodec, u32),
    ) -> Vec<u8> {
        let values: Vec<f32> = match self {
            Self::Nan => vec![f32::NAN; own.len()],
            Self::Negate | Self::Claim(_) => partner.unwrap_or(own).iter().map(|v| -v).collect(),
            Self::Scale(f) => own.iter().map(|v| v * f).collect(),
            Self::Oppose(cosine) => oppose(own, partner.unwrap_or(own), cosine),
            Self::Noise(relative) => {
                let sigma = relative * own_norm / (total.max(1) as f64).sqrt();
                own.iter()
                    .map(|v| v + (sigma * standard_normal()) as f32)
                    .collect()
            }
            Self::Stall => own.to_vec(),
        };
        codec.encode(index, total, &values)
    }
}

/// [`Attack::Oppose`]'s norm, relative to the partner's.
pub const OPPOSE_NORM: f64 = 1.45;

/// A vector at `cosine` with `target` and [`OPPOSE_NORM`] times its norm: `target`'s
/// direction times `cosine` plus, orthogonal to it, the part of `own` orthogonal to `target`
/// (a random direction where that is 0). Built piece by piece with the same cosine and ratio
/// in each, so the whole has them too.
fn oppose(own: &[f32], target: &[f32], cosine: f64) -> Vec<f32> {
    let target_sq = dot(target, target);
    if target_sq == 0.0 {
        return vec![0.0; target.len()];
    }
    // `v` less its part along `target`.
    let orthogonal = |v: &[f32]| -> Vec<f64> {
        let along = dot(v, target) / target_sq;
        v.iter()
            .zip(target)
            .map(|(x, t)| f64::from(*x) - along * f64::from(*t))
            .collect()
    };
    let squared = |v: &[f64]| v.iter().map(|x| x * x).sum::<f64>();
    let mut side = orthogonal(own);
    if squared(&side) <= 1e-12 * target_sq {
        // No usable part of `own`: a random direction instead.
        let random: Vec<f32> = (0..target.len())
            .map(|_| standard_normal() as f32)
            .collect();
        side = orthogonal(&random);
    }
    let side_norm = squared(&side).sqrt().max(f64::MIN_POSITIVE);
    let norm = target_sq.sqrt();
    let sine = (1.0 - cosine * cosine).max(0.0).sqrt();
    target
        .iter()
        .zip(&side)
        .map(|(t, s)| (OPPOSE_NORM * (cosine * f64::from(*t) + sine * norm * s / side_norm)) as f32)
        .collect()
}

/// One draw of a standard normal variable (Box–Muller).
fn standard_normal() -> f64 {
    let u1: f64 = rand::random::<f64>().max(f64::MIN_POSITIVE);
    let u2: f64 = rand::random();
    (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
}

#[cfg(test)]
mod tests {
    use super::*;
    use p2p_models::params as pm;
    use p2p_protocol::training::ParamDtype;

    const F32: PieceCodec = PieceCodec::Params(ParamDtype::F32);

    #[test]
    fn attacks_parse_and_bad_ones_say_why() {
        assert_eq!("nan".parse(), Ok(Attack::Nan));
        assert_eq!("scale=2.996".parse(), Ok(Attack::Scale(2.996)));
        assert_eq!("claim=1e12".parse(), Ok(Attack::Claim(1_000_000_000_000)));
        assert_eq!("stall".parse(), Ok(Attack::Stall));
        assert!("scale".parse::<Attack>().unwrap_err().contains("number"));
        assert!("fly"
            .parse::<Attack>()
            .unwrap_err()
            .contains("unknown attack"));
    }

    #[test]
    fn noise_has_the_relative_norm_asked_for() {
        let own = vec![1.0f32; 100_000];
        let norm = pm::l2_norm(&own);
        let bytes = Attack::Noise(1.996).piece(&own, None, norm, own.len(), (&F32, 0));
        let sent = F32.decode(0, own.len(), &bytes, own.len()).unwrap();
        let d = pm::relative_distance(&own, &sent);
        assert!((d - 1.996).abs() < 0.02, "{d}");
    }

    /// Built piece by piece, the whole lie has the cosine with the partner's values and the
    /// norm ratio asked for, also where its own values are parallel to the partner's.
    #[test]
    fn opposition_has_the_cosine_and_norm_asked_for_over_all_pieces() {
        let partner: Vec<f32> = (0..64).map(|i| ((i * 7 % 13) as f32 - 6.0) / 3.0).collect();
        let own: Vec<f32> = (0..64).map(|i| ((i * 5 % 11) as f32 - 5.0) / 4.0).collect();
        let attack: Attack = "oppose=-0.85".parse().unwrap();
        for own in [own, partner.iter().map(|v| v * 2.0).collect()] {
            let mut sent = Vec::new();
            for piece in 0..4 {
                let r = piece * 16..(piece + 1) * 16;
                let bytes = attack.piece(&own[r.clone()], Some(&partner[r]), 1.0, 16, (&F32, 0));
                sent.extend(F32.decode(0, 16, &bytes, 16).unwrap());
            }
            let cosine = pm::dot(&sent, &partner) / (pm::l2_norm(&sent) * pm::l2_norm(&partner));
            assert!((cosine + 0.85).abs() < 1e-4, "{cosine}");
            let ratio = pm::l2_norm(&sent) / pm::l2_norm(&partner);
            assert!((ratio - OPPOSE_NORM).abs() < 1e-4, "{ratio}");
        }
        assert!("oppose=-1.5"
            .parse::<Attack>()
            .unwrap_err()
            .contains("[-1, 1]"));
    }

    #[test]
    fn negation_targets_the_partner_when_known() {
        let own = vec![1.0f32; 4];
        let partner = vec![2.0f32; 4];
        let bytes = Attack::Negate.piece(&own, Some(&partner), 2.0, 4, (&F32, 0));
        let sent = F32.decode(0, 4, &bytes, 4).unwrap();
        assert_eq!(sent, vec![-2.0; 4]);
    }
}
