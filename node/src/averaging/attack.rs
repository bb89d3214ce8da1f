//! [`Attack`]: fault injection for tests and testnets, so that what a hostile peer can do to
//! averaging is tried with real nodes. A node given an attack (hidden flag
//! `--attack-averaging`) speaks the protocol correctly but lies in what it sends: the attacks
//! an adversarial peer found (see the security model in the README). Pure functions: the
//! behaviour asks what to send instead of its own parameters.

use std::str::FromStr;

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

    /// `nan`, `negate`, `scale=F`, `noise=D`, `claim=N` or `stall`.
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
            "claim" => Self::Claim(number("the samples claimed")? as u64),
            "stall" => Self::Stall,
            _ => {
                return Err(format!(
                    "unknown attack {kind:?}: nan, negate, scale=F, noise=D, claim=N or stall"
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
        matches!(self, Self::Negate | Self::Scale(_) | Self::Claim(_))
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

    #[test]
    fn negation_targets_the_partner_when_known() {
        let own = vec![1.0f32; 4];
        let partner = vec![2.0f32; 4];
        let bytes = Attack::Negate.piece(&own, Some(&partner), 2.0, 4, (&F32, 0));
        let sent = F32.decode(0, 4, &bytes, 4).unwrap();
        assert_eq!(sent, vec![-2.0; 4]);
    }
}
