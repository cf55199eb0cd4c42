//! Where a training step's time goes: a lap clock the step marks at each phase boundary.
//!
//! On the CPU every tensor op is synchronous, so wall time between marks is the phase's own
//! time, and the clock runs on every step at the cost of a few `Instant::now()` calls. On a
//! GPU ops only queue; a meaningful split needs a device synchronisation at each mark, which
//! would stall the pipeline, so callers time only sampled steps there (see
//! [`PhaseClock::start`]).

use std::time::Instant;

use tch::Device;

/// How many phases there are.
pub const PHASES: usize = 6;

/// The phases of one step. A family marks the ones it has; the others are charged nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Gathering this rank's real images, latents and coefficients.
    Data,
    /// D's forward pass on real and fake images, its loss (with any penalty) and backward.
    DiscriminatorForwardBackward,
    /// G's forward pass, and the backward pass of G's loss through D into G.
    GeneratorForwardBackward,
    /// Waiting for the group's gradient average.
    AllReduce,
    /// Finiteness checks, optimiser updates and the EMA.
    Optimizer,
    /// A one-network family's forward pass, loss and backward (VAE, autoregressive).
    ForwardBackward,
}

impl Phase {
    pub const ALL: [Phase; PHASES] = [
        Phase::Data,
        Phase::DiscriminatorForwardBackward,
        Phase::GeneratorForwardBackward,
        Phase::AllReduce,
        Phase::Optimizer,
        Phase::ForwardBackward,
    ];

    /// The phase's name in metrics (`phase` label).
    pub fn name(self) -> &'static str {
        match self {
            Phase::Data => "data",
            Phase::DiscriminatorForwardBackward => "d_forward_backward",
            Phase::GeneratorForwardBackward => "g_forward_backward",
            Phase::AllReduce => "allreduce",
            Phase::Optimizer => "optimizer",
            Phase::ForwardBackward => "forward_backward",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// Accumulates a step's seconds per phase between [`PhaseClock::start`] and
/// [`PhaseClock::take`].
#[derive(Debug)]
pub struct PhaseClock {
    running: bool,
    /// The CUDA device the step runs on, synchronised at each mark of a timed step.
    cuda: Option<i64>,
    last: Instant,
    seconds: [f64; PHASES],
}

impl PhaseClock {
    pub fn new(device: Device) -> Self {
        Self {
            running: false,
            cuda: match device {
                Device::Cuda(index) => Some(index as i64),
                _ => None,
            },
            last: Instant::now(),
            seconds: [0.0; PHASES],
        }
    }

    /// Whether steps on this device need synchronising to be timed (sample them, then).
    pub fn needs_sync(&self) -> bool {
        self.cuda.is_some()
    }

    /// Starts timing a step (or, with `timed == false`, leaves it untimed).
    pub fn start(&mut self, timed: bool) {
        self.running = timed;
        self.seconds = [0.0; PHASES];
        if timed {
            self.sync();
            self.last = Instant::now();
        }
    }

    /// Charges the time since the previous mark to `phase`.
    pub fn lap(&mut self, phase: Phase) {
        if !self.running {
            return;
        }
        self.sync();
        let now = Instant::now();
        self.seconds[phase.index()] += now.duration_since(self.last).as_secs_f64();
        self.last = now;
    }

    /// The timed step's seconds per phase, and stops the clock (`None` if untimed).
    pub fn take(&mut self) -> Option<[(Phase, f64); PHASES]> {
        if !std::mem::replace(&mut self.running, false) {
            return None;
        }
        Some(Phase::ALL.map(|p| (p, self.seconds[p.index()])))
    }

    /// Waits for the step's device, so a lap covers the GPU work queued in its phase and not
    /// only its enqueueing (an NCCL all-reduce, a backward pass return long before their
    /// kernels finish). Timed steps only: untimed ones keep the host running ahead.
    fn sync(&self) {
        if let Some(index) = self.cuda {
            tch::Cuda::synchronize(index);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn laps_are_charged_to_their_phase() {
        let mut clock = PhaseClock::new(Device::Cpu);
        clock.start(true);
        std::thread::sleep(std::time::Duration::from_millis(20));
        clock.lap(Phase::Data);
        clock.lap(Phase::Optimizer);
        let seconds = clock.take().expect("a timed step");
        assert!(seconds[0].1 >= 0.02, "{seconds:?}");
        assert_eq!(seconds[4].0, Phase::Optimizer);
        // Phases never marked are charged nothing.
        assert!(
            seconds[1..4]
                .iter()
                .chain(&seconds[5..])
                .all(|(_, s)| *s == 0.0),
            "{seconds:?}"
        );
        assert!(clock.take().is_none(), "take stops the clock");
    }

    #[test]
    fn an_untimed_step_reports_nothing() {
        let mut clock = PhaseClock::new(Device::Cpu);
        clock.start(false);
        clock.lap(Phase::Data);
        assert!(clock.take().is_none());
    }
}
