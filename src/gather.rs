//! A request body's framing, made sensible before it costs anything: small frames gathered into
//! larger ones, and framing no real client produces refused.
//!
//! hyper hands snapguard one frame per HTTP/1 chunk or HTTP/2 DATA frame, however small, and
//! each one costs a turn of the connection's task and, forwarded as it came, an upstream write
//! and a chunk of its own there. 64 KiB sent as 65,536 one-byte chunks would cost snapguard
//! some 200 times what the same body costs in one piece, and the upstream as much again.
//! [`Gather`] bounds both: frames under [`SMALL`] bytes that are ready together, or arrive within
//! [`GATHER_FOR`], go on as one frame of up to [`GATHER`] bytes (hyper's client re-frames it: one
//! chunk, one write), and a body that, past [`FRAMES_FREE`] frames, averages under [`MIN_FRAME`]
//! bytes a frame is cut with [`Stall::Fragmented`] (400, counted as `body_fragmented`). The
//! refusal is the answer to the per-frame cost that gathering cannot remove: it is paid before
//! gathering. Frames of [`SMALL`] bytes or more, what hyper yields for a body sent whole, go on
//! as they are: copying them would cost every ordinary upload and save nothing.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use hyper::body::{Body, Frame, SizeHint};
use tokio::time::Sleep;

use crate::lifetime::Stall;
use crate::upstream::BoxError;

/// Frames a body may come in whatever their size...
pub const FRAMES_FREE: u64 = 1024;
/// ...past which they must average at least this many bytes. Real clients write what they
/// have: HTTP/2 DATA frames of up to 16 KiB, chunks of a buffer's size.
pub const MIN_FRAME: u64 = 32;
/// Frames under this many bytes are gathered...
const SMALL: usize = 4 * 1024;
/// ...up to this many bytes (what one read of a body sent whole yields: the upstream sees the
/// writes a normally framed body causes)...
const GATHER: usize = 64 * 1024;
/// ...or for at most this long after the first of them, before they go on as one.
const GATHER_FOR: Duration = Duration::from_millis(2);

/// Whether a body that came in `frames` frames carrying `bytes` bytes is fragmented past what
/// any client does (and what snapguard pays for).
pub fn too_fragmented(frames: u64, bytes: u64) -> bool {
    frames > FRAMES_FREE && bytes < frames.saturating_mul(MIN_FRAME)
}

/// A body whose small frames are gathered, and whose fragmentation is bounded; or, for a
/// response, the body as it comes ([`Gather::relay`]): the upstream is not held to a client's
/// framing rules.
#[derive(Debug)]
pub struct Gather<B> {
    inner: Option<B>,
    gathering: bool,
    frames: u64,
    bytes: u64,
    /// Allocated at the first small frame: most bodies never have one, and a body is moved
    /// several times on its way.
    state: Option<Box<Gathered>>,
}

/// Small frames gathered so far, and what goes after them.
#[derive(Debug)]
struct Gathered {
    data: BytesMut,
    /// When what was gathered must go at the latest.
    flush: Pin<Box<Sleep>>,
    /// A frame that came after gathered data (trailers, or a frame too large to gather), sent
    /// on the next poll.
    held: Option<Frame<Bytes>>,
}

impl<B> Gather<B> {
    /// A request body: gathered, fragmentation bounded.
    pub fn request(inner: B) -> Self {
        Self::new(inner, true)
    }

    /// A response body: frames go on as they come.
    pub fn relay(inner: B) -> Self {
        Self::new(inner, false)
    }

    fn new(inner: B, gathering: bool) -> Self {
        Self {
            inner: Some(inner),
            gathering,
            frames: 0,
            bytes: 0,
            state: None,
        }
    }

    /// What was gathered, as one frame; the held frame or the end when nothing was.
    fn send_gathered(&mut self) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let Some(state) = self.state.as_mut() else {
            return Poll::Ready(None);
        };
        if state.data.is_empty() {
            return Poll::Ready(state.held.take().map(Ok));
        }
        Poll::Ready(Some(Ok(Frame::data(state.data.split().freeze()))))
    }

    /// Bytes gathered and not sent yet.
    fn gathered(&self) -> usize {
        self.state.as_ref().map_or(0, |s| s.data.len())
    }
}

impl<B> Body for Gather<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        if !this.gathering {
            return match this.inner.as_mut() {
                Some(inner) => Pin::new(inner).poll_frame(cx).map_err(Into::into),
                None => Poll::Ready(None),
            };
        }
        if let Some(state) = this.state.as_mut().filter(|s| s.data.is_empty()) {
            if let Some(held) = state.held.take() {
                return Poll::Ready(Some(Ok(held)));
            }
        }
        loop {
            let Some(inner) = this.inner.as_mut() else {
                return this.send_gathered();
            };
            let polled = Pin::new(&mut *inner).poll_frame(cx);
            let ended = inner.is_end_stream();
            // Room for what the body says is left, up to GATHER: gathering allocates once.
            let room = inner.size_hint().upper().map_or(GATHER, |rest| {
                usize::try_from(rest).unwrap_or(GATHER).min(GATHER)
            });
            match polled {
                Poll::Ready(Some(Ok(frame))) => {
                    let data = match frame.into_data() {
                        Ok(data) => data,
                        Err(trailers) if this.gathered() == 0 => {
                            return Poll::Ready(Some(Ok(trailers)));
                        }
                        Err(trailers) => {
                            if let Some(state) = this.state.as_mut() {
                                state.held = Some(trailers);
                            }
                            return this.send_gathered();
                        }
                    };
                    this.frames += 1;
                    this.bytes += data.len() as u64;
                    if too_fragmented(this.frames, this.bytes) {
                        this.inner = None;
                        return Poll::Ready(Some(Err(Stall::Fragmented(this.frames).into())));
                    }
                    if ended {
                        this.inner = None;
                    }
                    // A frame large enough, or the last one with nothing gathered before it (a
                    // small body in one piece), goes on as it is, uncopied, after what was
                    // gathered.
                    if data.len() >= SMALL || (ended && this.gathered() == 0) {
                        return match this.state.as_mut().filter(|s| !s.data.is_empty()) {
                            Some(state) => {
                                state.held = Some(Frame::data(data));
                                this.send_gathered()
                            }
                            None => Poll::Ready(Some(Ok(Frame::data(data)))),
                        };
                    }
                    let at = tokio::time::Instant::now() + GATHER_FOR;
                    let state = this.state.get_or_insert_with(|| {
                        Box::new(Gathered {
                            data: BytesMut::new(),
                            flush: Box::pin(tokio::time::sleep_until(at)),
                            held: None,
                        })
                    });
                    if state.data.is_empty() {
                        // Reserved whole once: grown by doubling, it would be copied again.
                        state
                            .data
                            .reserve(room.saturating_add(data.len()).min(GATHER + SMALL));
                        state.flush.as_mut().reset(at);
                    }
                    state.data.extend_from_slice(&data);
                    if this.inner.is_none() || state.data.len() >= GATHER {
                        return this.send_gathered();
                    }
                }
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Some(Err(e.into()))),
                Poll::Ready(None) => {
                    this.inner = None;
                    return this.send_gathered();
                }
                Poll::Pending => {
                    let Some(state) = this.state.as_mut().filter(|s| !s.data.is_empty()) else {
                        return Poll::Pending;
                    };
                    return if state.flush.as_mut().poll(cx).is_ready() {
                        this.send_gathered()
                    } else {
                        Poll::Pending
                    };
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        let held = self.state.as_ref().is_some_and(|s| s.held.is_some());
        self.gathered() == 0 && !held && self.inner.as_ref().is_none_or(Body::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        let held_data = self
            .state
            .as_ref()
            .and_then(|s| s.held.as_ref())
            .and_then(Frame::data_ref)
            .map_or(0, Bytes::len);
        let held = (self.gathered() + held_data) as u64;
        match &self.inner {
            Some(inner) => {
                let hint = inner.size_hint();
                let mut sum = SizeHint::new();
                sum.set_lower(hint.lower() + held);
                if let Some(upper) = hint.upper() {
                    sum.set_upper(upper + held);
                }
                sum
            }
            None => SizeHint::with_exact(held),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;
    use std::collections::VecDeque;

    /// Frames that are all ready at once, then, unless `ends`, a body that waits forever.
    struct Frames {
        frames: VecDeque<Frame<Bytes>>,
        ends: bool,
    }

    fn body(frames: Vec<Frame<Bytes>>) -> Frames {
        Frames {
            frames: frames.into(),
            ends: true,
        }
    }

    impl Body for Frames {
        type Data = Bytes;
        type Error = std::convert::Infallible;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
            match self.frames.pop_front() {
                Some(frame) => Poll::Ready(Some(Ok(frame))),
                None if self.ends => Poll::Ready(None),
                None => Poll::Pending,
            }
        }

        fn is_end_stream(&self) -> bool {
            self.ends && self.frames.is_empty()
        }
    }

    fn data(n: usize, byte: u8) -> Frame<Bytes> {
        Frame::data(Bytes::from(vec![byte; n]))
    }

    async fn frames_of<B>(mut b: Gather<B>) -> Result<Vec<Frame<Bytes>>, BoxError>
    where
        B: Body<Data = Bytes> + Unpin,
        B::Error: Into<BoxError>,
    {
        let mut out = Vec::new();
        while let Some(frame) = b.frame().await {
            out.push(frame?);
        }
        Ok(out)
    }

    fn sizes(frames: &[Frame<Bytes>]) -> Vec<usize> {
        frames
            .iter()
            .filter_map(|f| f.data_ref().map(Bytes::len))
            .collect()
    }

    #[test]
    fn fragmentation_is_judged_on_the_average_past_the_free_frames() {
        assert!(!too_fragmented(FRAMES_FREE, 1));
        assert!(too_fragmented(FRAMES_FREE + 1, 1));
        assert!(!too_fragmented(
            FRAMES_FREE + 1,
            (FRAMES_FREE + 1) * MIN_FRAME
        ));
        assert!(too_fragmented(10_000, 10_000 * MIN_FRAME - 1));
    }

    #[tokio::test]
    async fn ready_small_frames_go_on_together_large_ones_as_they_are() {
        let out = frames_of(Gather::request(body(
            (0..100).map(|_| data(32, 1)).collect(),
        )))
        .await
        .unwrap();
        assert_eq!(sizes(&out), [3200]);

        let out = frames_of(Gather::request(body(vec![
            data(GATHER, 2),
            data(GATHER, 3),
        ])))
        .await
        .unwrap();
        assert_eq!(sizes(&out), [GATHER, GATHER]);

        // A frame of SMALL bytes or more is never copied: what was gathered goes first.
        let frames = vec![data(10, 5), data(10, 6), data(SMALL, 7), data(10, 8)];
        let out = frames_of(Gather::request(body(frames))).await.unwrap();
        assert_eq!(sizes(&out), [20, SMALL, 10]);

        // 2,000 frames of 100 bytes: gathered until a frame crosses GATHER (656 of them).
        let out = frames_of(Gather::request(body(
            (0..2000).map(|_| data(100, 4)).collect(),
        )))
        .await
        .unwrap();
        assert_eq!(sizes(&out), [65_600, 65_600, 65_600, 3_200]);
        let whole: Vec<u8> = out
            .iter()
            .filter_map(|f| f.data_ref())
            .flatten()
            .copied()
            .collect();
        assert_eq!(whole, vec![4u8; 200_000]);
    }

    #[tokio::test]
    async fn a_small_body_in_one_piece_goes_on_uncopied() {
        let only = Bytes::from_static(br#"{"snapshot":{"name":"a"}}"#);
        let out = frames_of(Gather::request(body(vec![Frame::data(only.clone())])))
            .await
            .unwrap();
        assert_eq!(out.len(), 1);
        let sent = out[0].data_ref().unwrap();
        assert_eq!(sent.as_ptr(), only.as_ptr(), "copied");
    }

    #[tokio::test]
    async fn trailers_follow_the_gathered_data() {
        let mut trailers = http::HeaderMap::new();
        trailers.insert("x-checksum", http::HeaderValue::from_static("1"));
        let frames = vec![data(2, b'a'), data(2, b'b'), Frame::trailers(trailers)];
        let out = frames_of(Gather::request(body(frames))).await.unwrap();
        assert_eq!(out.len(), 2);
        assert_eq!(out[0].data_ref().map(|d| &d[..]), Some(&b"aabb"[..]));
        assert!(out[1].is_trailers());
    }

    #[tokio::test]
    async fn one_byte_frames_are_refused_past_the_free_ones_in_requests_only() {
        let tiny = || body((0..5000).map(|_| data(1, b'x')).collect());
        let err = frames_of(Gather::request(tiny())).await.unwrap_err();
        assert_eq!(
            Stall::find(err.as_ref()),
            Some(Stall::Fragmented(FRAMES_FREE + 1))
        );
        assert_eq!(frames_of(Gather::relay(tiny())).await.unwrap().len(), 5000);
        // Ordinary small frames, as many: 5,000 of 64 bytes pass.
        let ok = body((0..5000).map(|_| data(64, b'y')).collect());
        assert_eq!(
            sizes(&frames_of(Gather::request(ok)).await.unwrap())
                .iter()
                .sum::<usize>(),
            320_000
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_small_frame_waits_at_most_gather_for_when_nothing_follows() {
        let mut gathered = Gather::request(Frames {
            frames: vec![data(1, b'a')].into(),
            ends: false,
        });
        let started = tokio::time::Instant::now();
        let frame = gathered.frame().await.unwrap().unwrap();
        assert_eq!(frame.data_ref().map(|d| &d[..]), Some(&b"a"[..]));
        assert_eq!(started.elapsed(), GATHER_FOR);
        assert!(!gathered.is_end_stream());
    }
}
