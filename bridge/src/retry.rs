//! When to send a callback again, and after how long: the pure part of delivery.
//!
//! Answers 5xx, 408 and 429 (and no answer at all) call for a retry; any other refusal is final.
//! Pauses grow with decorrelated jitter: each is drawn between the first pause and three times
//! the previous one, at most the maximum, so the pods that failed together during an outage of
//! the callback API do not come back together. A `Retry-After` on 429 or 503 (delta-seconds or
//! HTTP-date) is a lower bound: the pause is the longer of it and the jittered backoff. A hint
//! beyond the backoff maximum is cut to the maximum (30 s by default), so that a wrong answer
//! cannot hold a pod's buffer for hours.

use std::time::{Duration, SystemTime};

/// Backoff bounds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    /// First pause, and the shortest jittered one.
    pub initial: Duration,
    /// Longest pause.
    pub max: Duration,
}

impl Backoff {
    /// The pause after `pause` without jitter: doubled, at most `max`.
    pub fn next(&self, pause: Duration) -> Duration {
        (pause * 2).min(self.max)
    }

    /// The pause before reconnecting to OpenCode after `pause`: the first pause, again and
    /// again, until the stream was ever open (OpenCode is still starting, and a pod is Ready
    /// only once the bridge follows it), and growing after a broken connection.
    pub fn reconnect(&self, pause: Duration, connected_before: bool) -> Duration {
        if connected_before {
            self.next(pause)
        } else {
            self.initial
        }
    }

    /// The pause after `previous` with decorrelated jitter: `initial` plus `fraction` (in
    /// `[0, 1)`, clamped) of the way to three times `previous`, at most `max`.
    pub fn jittered(&self, previous: Duration, fraction: f64) -> Duration {
        let fraction = if fraction.is_finite() {
            fraction.clamp(0.0, 1.0)
        } else {
            0.0
        };
        let span = previous.saturating_mul(3).saturating_sub(self.initial);
        self.initial
            .saturating_add(span.mul_f64(fraction))
            .min(self.max)
    }

    /// The pause before the next attempt after `previous`: the jittered backoff, or the
    /// server's `retry_after` when it asks for longer (at most `max`).
    pub fn retry_pause(
        &self,
        previous: Duration,
        retry_after: Option<Duration>,
        fraction: f64,
    ) -> Duration {
        let jittered = self.jittered(previous, fraction);
        match retry_after {
            Some(hint) => hint.min(self.max).max(jittered),
            None => jittered,
        }
    }
}

/// Whether a non-2xx status means "later" (5xx, 408, 429) rather than "never".
pub fn is_retryable(status: u16) -> bool {
    (500..600).contains(&status) || status == 408 || status == 429
}

/// Whether an answer with this status may carry a `Retry-After` the bridge honours (429, 503).
pub fn honours_retry_after(status: u16) -> bool {
    status == 429 || status == 503
}

/// A `Retry-After` value as a pause from `now`: delta-seconds (`120`) or an HTTP-date (a date in
/// the past gives zero). Anything else gives `None`.
pub fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) {
        // All digits but too many for a u64: far beyond any cap, so the longest pause.
        return Some(Duration::from_secs(value.parse().unwrap_or(u64::MAX)));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

#[cfg(test)]
mod tests {
    use std::time::UNIX_EPOCH;

    use super::*;

    const BACKOFF: Backoff = Backoff {
        initial: Duration::from_millis(100),
        max: Duration::from_secs(2),
    };

    fn ms(millis: u64) -> Duration {
        Duration::from_millis(millis)
    }

    #[test]
    fn a_bridge_polls_a_starting_opencode_at_the_first_pause_and_backs_off_only_after_a_break() {
        let pause = BACKOFF.initial;
        assert_eq!(BACKOFF.reconnect(pause, false), BACKOFF.initial);
        assert_eq!(BACKOFF.reconnect(BACKOFF.max, false), BACKOFF.initial);
        assert_eq!(BACKOFF.reconnect(pause, true), BACKOFF.next(pause));
    }

    #[test]
    fn backoff_without_jitter_doubles_up_to_its_maximum() {
        let backoff = Backoff {
            initial: ms(100),
            max: ms(350),
        };
        let pauses: Vec<u128> =
            std::iter::successors(Some(backoff.initial), |p| Some(backoff.next(*p)))
                .take(4)
                .map(|p| p.as_millis())
                .collect();
        assert_eq!(pauses, [100, 200, 350, 350]);
    }

    #[test]
    fn a_jittered_pause_lies_between_the_first_pause_and_three_times_the_previous_one() {
        assert_eq!(BACKOFF.jittered(ms(400), 0.0), ms(100));
        assert_eq!(BACKOFF.jittered(ms(400), 0.5), ms(650));
        let longest = BACKOFF.jittered(ms(400), 0.999_999);
        assert!(ms(1199) < longest && longest < ms(1200), "{longest:?}");
        // The first retry after the initial pause: 100 ms to 300 ms.
        assert_eq!(BACKOFF.jittered(BACKOFF.initial, 0.5), ms(200));
    }

    #[test]
    fn a_jittered_pause_never_exceeds_the_maximum_nor_panics_on_odd_fractions() {
        assert_eq!(BACKOFF.jittered(ms(1500), 0.9), BACKOFF.max);
        assert_eq!(BACKOFF.jittered(Duration::MAX, 0.9), BACKOFF.max);
        assert_eq!(BACKOFF.jittered(ms(400), f64::NAN), ms(100));
        assert_eq!(BACKOFF.jittered(ms(400), -3.0), ms(100));
        assert_eq!(BACKOFF.jittered(ms(400), 7.0), ms(1200));
    }

    #[test]
    fn pods_that_fail_together_spread_their_retries() {
        let pauses: Vec<Duration> = [0.05, 0.35, 0.65, 0.95]
            .iter()
            .map(|&fraction| BACKOFF.jittered(ms(800), fraction))
            .collect();
        assert!(
            pauses.windows(2).all(|pair| pair[0] < pair[1]),
            "{pauses:?}"
        );
    }

    #[test]
    fn retry_after_is_a_lower_bound_cut_to_the_maximum() {
        // The server asks for longer than the backoff: its hint wins.
        assert_eq!(
            BACKOFF.retry_pause(ms(100), Some(Duration::from_secs(1)), 0.5),
            Duration::from_secs(1)
        );
        // The backoff is already longer: the hint does not shorten it.
        assert_eq!(BACKOFF.retry_pause(ms(600), Some(ms(10)), 0.5), ms(950));
        // A hostile or broken hint cannot park the buffer beyond the maximum.
        assert_eq!(
            BACKOFF.retry_pause(ms(100), Some(Duration::from_secs(86_400)), 0.5),
            BACKOFF.max
        );
        assert_eq!(BACKOFF.retry_pause(ms(100), None, 0.5), ms(200));
    }

    #[test]
    fn only_408_429_and_5xx_are_retried() {
        for status in [408, 429, 500, 502, 503, 504] {
            assert!(is_retryable(status), "{status}");
        }
        for status in [301, 400, 401, 404, 409, 413, 415, 422] {
            assert!(!is_retryable(status), "{status}");
        }
        assert!(honours_retry_after(429) && honours_retry_after(503));
        assert!(!honours_retry_after(500) && !honours_retry_after(408));
    }

    #[test]
    fn retry_after_reads_delta_seconds_and_http_dates() {
        let now = UNIX_EPOCH + Duration::from_secs(1_445_412_480);
        assert_eq!(parse_retry_after("1", now), Some(Duration::from_secs(1)));
        assert_eq!(
            parse_retry_after(" 120 ", now),
            Some(Duration::from_secs(120))
        );
        assert_eq!(
            parse_retry_after("99999999999999999999999", now),
            Some(Duration::from_secs(u64::MAX))
        );
        // 2015-10-21 07:28:00 GMT, 30 s after `now`.
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:28:30 GMT", now),
            Some(Duration::from_secs(30))
        );
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:27:00 GMT", now),
            Some(Duration::ZERO)
        );
        for junk in ["", "-1", "1.5", "soon", "Wed, 32 Oct 2015 07:28:00 GMT"] {
            assert_eq!(parse_retry_after(junk, now), None, "{junk:?}");
        }
    }
}
