//! Segments: one projection run as `N` parts, each holding the streams whose stable hash falls
//! into it, so several workers (processes, nodes) share a projection while every stream is
//! applied by one of them, in its order.
//!
//! A stream belongs to segment `stream_hash(stream) % N` ([`Segment::of`]). The hash is FNV-1a
//! (64 bits) over the aggregate type, a `0x1f` separator and the aggregate id: it is part of the
//! stored data's meaning (a changed hash would move streams between segments mid-flight) and is
//! therefore fixed here, not taken from a crate or from `std` (whose `DefaultHasher` may change
//! between releases); a unit test pins its values.
//!
//! **Changing `N` while running** (split and merge, or any `N -> M`): [`rescale`] computes the new
//! segments from the old ones' checkpoints. New segment `j` starts at the smallest checkpoint of
//! the old segments that share streams with it and remembers, for each of those that were ahead,
//! how far it had applied its streams ([`AppliedPart`]): events of those streams up to there are
//! passed, not applied again. So a split (`8 -> 16`) hands each half its parent's checkpoint,
//! and a merge of segments at different checkpoints neither skips the laggard's events nor
//! repeats the leader's (a global order position alone could not say both; Axon's merged tracking
//! token solves the same problem the same way).

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::envelope::{Checkpoint, StoredEvent, StreamId};

/// The most segments a projection can have.
pub const MAX_SEGMENTS: u32 = 1024;

/// A stream's stable hash: FNV-1a (64 bits) over the aggregate type, `0x1f`, the aggregate id.
#[must_use]
pub fn stream_hash(stream: &StreamId) -> u64 {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    let bytes = stream
        .aggregate_type
        .as_bytes()
        .iter()
        .chain(&[0x1f])
        .chain(stream.aggregate_id.as_str().as_bytes());
    bytes.fold(OFFSET, |hash, byte| {
        (hash ^ u64::from(*byte)).wrapping_mul(PRIME)
    })
}

/// Why a segment or a layout is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SegmentError {
    /// A segment count of 0 or above [`MAX_SEGMENTS`].
    #[error("a projection has 1 to {MAX_SEGMENTS} segments, not {0}")]
    Count(u32),
    /// An index not below the count.
    #[error("segment {index} does not exist in {count} segments (indexes are 0 to {})", count - 1)]
    Index {
        /// The index given.
        index: u32,
        /// The count.
        count: u32,
    },
    /// Text that is not `<index>/<count>`.
    #[error("`{0}` is not a segment: write `<index>/<count>`, e.g. `3/8`")]
    Syntax(String),
    /// The old segments handed to [`rescale`] are not one whole layout.
    #[error("the segments are not one whole layout: {0}")]
    Layout(String),
}

/// One of a projection's `count` segments.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "(u32, u32)", into = "(u32, u32)")]
pub struct Segment {
    index: u32,
    count: u32,
}

impl Segment {
    /// The whole projection: one segment of one.
    pub const WHOLE: Self = Self { index: 0, count: 1 };

    /// Segment `index` of `count`.
    ///
    /// # Errors
    /// [`SegmentError::Count`] for a count of 0 or above [`MAX_SEGMENTS`],
    /// [`SegmentError::Index`] for an index not below it.
    pub fn new(index: u32, count: u32) -> Result<Self, SegmentError> {
        if count == 0 || count > MAX_SEGMENTS {
            return Err(SegmentError::Count(count));
        }
        if index >= count {
            return Err(SegmentError::Index { index, count });
        }
        Ok(Self { index, count })
    }

    /// The segment of `stream` among `count` (a count of 0 is taken as 1).
    #[must_use]
    pub fn of(stream: &StreamId, count: u32) -> Self {
        let count = count.clamp(1, MAX_SEGMENTS);
        let index = u32::try_from(stream_hash(stream) % u64::from(count)).unwrap_or(0);
        Self { index, count }
    }

    /// Its index.
    #[must_use]
    pub fn index(self) -> u32 {
        self.index
    }

    /// How many segments there are.
    #[must_use]
    pub fn count(self) -> u32 {
        self.count
    }

    /// Whether `stream` belongs to this segment.
    #[must_use]
    pub fn contains(self, stream: &StreamId) -> bool {
        Self::of(stream, self.count) == self
    }

    /// Whether some stream belongs to both segments (of any counts): their indexes agree modulo
    /// the greatest common divisor of the counts.
    #[must_use]
    pub fn overlaps(self, other: Self) -> bool {
        let common = gcd(self.count, other.count);
        self.index % common == other.index % common
    }
}

fn gcd(mut a: u32, mut b: u32) -> u32 {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a.max(1)
}

impl fmt::Display for Segment {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.index, self.count)
    }
}

impl std::str::FromStr for Segment {
    type Err = SegmentError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let (index, count) = text
            .split_once('/')
            .ok_or_else(|| SegmentError::Syntax(text.to_owned()))?;
        let number = |part: &str| {
            part.trim()
                .parse::<u32>()
                .map_err(|_| SegmentError::Syntax(text.to_owned()))
        };
        Self::new(number(index)?, number(count)?)
    }
}

impl TryFrom<(u32, u32)> for Segment {
    type Error = SegmentError;

    fn try_from((index, count): (u32, u32)) -> Result<Self, Self::Error> {
        Self::new(index, count)
    }
}

impl From<Segment> for (u32, u32) {
    fn from(segment: Segment) -> Self {
        (segment.index, segment.count)
    }
}

/// What an earlier segment had applied: the events of its streams up to `through`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppliedPart {
    /// The earlier segment (of an earlier count).
    pub segment: Segment,
    /// How far its streams were applied.
    pub through: Checkpoint,
}

/// A segment as stored: where it stands and what earlier segments applied beyond that.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SegmentState {
    /// The segment.
    pub segment: Segment,
    /// Its checkpoint: every event of its streams up to here is passed.
    pub checkpoint: Checkpoint,
    /// Parts of its streams applied further than the checkpoint (after a rescale).
    pub applied: Vec<AppliedPart>,
}

impl SegmentState {
    /// Whether the segment applies `event`: the event's stream is in it and no earlier segment
    /// applied the event already.
    #[must_use]
    pub fn admits<T>(&self, event: &StoredEvent<T>) -> bool {
        self.segment.contains(&event.stream)
            && !self.applied.iter().any(|part| {
                event.checkpoint <= part.through && part.segment.contains(&event.stream)
            })
    }
}

/// The segments of a layout of `count` that replace `old` (one whole layout, every index of its
/// count once), each starting where no event of its streams is skipped or applied twice (see the
/// module docs). `count` may be anything from 1 to [`MAX_SEGMENTS`]: a split, a merge, or neither.
///
/// # Errors
/// [`SegmentError::Count`], [`SegmentError::Layout`] when `old` is not one whole layout.
pub fn rescale(old: &[SegmentState], count: u32) -> Result<Vec<SegmentState>, SegmentError> {
    let Some(first) = old.first() else {
        return Err(SegmentError::Layout("there are none".into()));
    };
    let old_count = first.segment.count;
    let mut seen = vec![false; old_count as usize];
    for state in old {
        if state.segment.count != old_count {
            return Err(SegmentError::Layout(format!(
                "segment {} is of another count than {}",
                state.segment, first.segment
            )));
        }
        let slot = &mut seen[state.segment.index as usize];
        if std::mem::replace(slot, true) {
            return Err(SegmentError::Layout(format!(
                "segment {} appears twice",
                state.segment
            )));
        }
    }
    if let Some(missing) = seen.iter().position(|seen| !seen) {
        return Err(SegmentError::Layout(format!(
            "segment {missing}/{old_count} is missing"
        )));
    }
    if count == 0 || count > MAX_SEGMENTS {
        return Err(SegmentError::Count(count));
    }
    Ok((0..count)
        .map(|index| {
            let segment = Segment { index, count };
            let parents: Vec<&SegmentState> = old
                .iter()
                .filter(|state| state.segment.overlaps(segment))
                .collect();
            let checkpoint = parents
                .iter()
                .map(|state| state.checkpoint)
                .min()
                .unwrap_or(Checkpoint::START);
            let mut applied: Vec<AppliedPart> = parents
                .iter()
                .flat_map(|state| {
                    let own = AppliedPart {
                        segment: state.segment,
                        through: state.checkpoint,
                    };
                    std::iter::once(own).chain(state.applied.iter().copied())
                })
                .filter(|part| part.through > checkpoint && part.segment.overlaps(segment))
                .collect();
            applied.sort_by_key(|part| (part.segment, part.through));
            applied.dedup();
            SegmentState {
                segment,
                checkpoint,
                applied,
            }
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stream(id: usize) -> StreamId {
        StreamId::new("Order", format!("order-{id}"))
    }

    #[test]
    fn the_hash_is_pinned() {
        // Changing these values moves streams between segments of running projections.
        assert_eq!(stream_hash(&StreamId::new("", "")), 0xaf63_d24c_8601_db8e);
        assert_eq!(
            stream_hash(&StreamId::new("Order", "order-1")),
            0x95b9_168a_f62c_ea42
        );
        assert_ne!(
            stream_hash(&StreamId::new("Ord", "erorder-1")),
            stream_hash(&StreamId::new("Order", "order-1"))
        );
        let counts = (0..8_000).fold([0u32; 8], |mut counts, id| {
            counts[Segment::of(&stream(id), 8).index() as usize] += 1;
            counts
        });
        assert!(
            counts.iter().all(|&n| (850..1150).contains(&n)),
            "{counts:?}"
        );
    }

    #[test]
    fn segments_parse_and_refuse() {
        assert_eq!("3/8".parse::<Segment>(), Segment::new(3, 8));
        assert_eq!(
            "8/8".parse::<Segment>(),
            Err(SegmentError::Index { index: 8, count: 8 })
        );
        assert_eq!("0/0".parse::<Segment>(), Err(SegmentError::Count(0)));
        assert!(matches!(
            "3".parse::<Segment>(),
            Err(SegmentError::Syntax(_))
        ));
        assert_eq!(Segment::new(5, 16).unwrap().to_string(), "5/16");
    }

    /// Simulates a log of events over streams, segments at different checkpoints, a rescale,
    /// and checks that every event is applied exactly once across the change.
    fn exactly_once_across(old_count: u32, new_count: u32) {
        let events: Vec<StoredEvent<()>> = (0..600u64)
            .map(|n| StoredEvent {
                event_id: crate::envelope::EventId::new(),
                stream: stream(usize::try_from(n % 37).unwrap()),
                version: n / 37 + 1,
                checkpoint: Checkpoint::new(n + 1, n + 1),
                recorded_at: chrono::Utc::now(),
                event_type: "E".into(),
                schema_version: 1,
                payload: (),
                metadata: crate::envelope::Metadata::default(),
            })
            .collect();
        let mut applied = vec![0u32; events.len()];
        let old: Vec<SegmentState> = (0..old_count)
            .map(|index| SegmentState {
                segment: Segment::new(index, old_count).unwrap(),
                checkpoint: Checkpoint::new(
                    u64::from(index) * 61 % 500,
                    u64::from(index) * 61 % 500,
                ),
                applied: Vec::new(),
            })
            .collect();
        for state in &old {
            for (n, event) in events.iter().enumerate() {
                if event.checkpoint <= state.checkpoint && state.admits(event) {
                    applied[n] += 1;
                }
            }
        }
        let new = rescale(&old, new_count).unwrap();
        for state in &new {
            for (n, event) in events.iter().enumerate() {
                if event.checkpoint > state.checkpoint && state.admits(event) {
                    applied[n] += 1;
                }
            }
        }
        assert!(
            applied.iter().all(|&n| n == 1),
            "{old_count} -> {new_count}: {applied:?}"
        );
    }

    #[test]
    fn rescaling_applies_every_event_once() {
        for (from, to) in [(1, 8), (8, 16), (16, 8), (8, 3), (3, 5), (5, 1), (8, 8)] {
            exactly_once_across(from, to);
        }
    }

    #[test]
    fn rescaling_twice_keeps_what_was_applied() {
        let old = vec![
            SegmentState {
                segment: Segment::new(0, 2).unwrap(),
                checkpoint: Checkpoint::new(10, 10),
                applied: Vec::new(),
            },
            SegmentState {
                segment: Segment::new(1, 2).unwrap(),
                checkpoint: Checkpoint::new(50, 50),
                applied: Vec::new(),
            },
        ];
        let merged = rescale(&old, 1).unwrap();
        assert_eq!(merged[0].checkpoint, Checkpoint::new(10, 10));
        assert_eq!(merged[0].applied.len(), 1);
        let split = rescale(&merged, 4).unwrap();
        // Segments 1/4 and 3/4 hold streams of 1/2, which had applied up to 50.
        assert!(
            split[1]
                .applied
                .iter()
                .any(|p| p.through == Checkpoint::new(50, 50))
        );
        assert!(split[0].applied.is_empty());
    }

    #[test]
    fn broken_layouts_are_refused() {
        let state = |index, count| SegmentState {
            segment: Segment::new(index, count).unwrap(),
            checkpoint: Checkpoint::START,
            applied: Vec::new(),
        };
        assert!(matches!(rescale(&[], 2), Err(SegmentError::Layout(_))));
        assert!(matches!(
            rescale(&[state(0, 2)], 2),
            Err(SegmentError::Layout(_))
        ));
        assert!(matches!(
            rescale(&[state(0, 2), state(0, 2)], 2),
            Err(SegmentError::Layout(_))
        ));
        assert_eq!(rescale(&[state(0, 1)], 0), Err(SegmentError::Count(0)));
    }
}
