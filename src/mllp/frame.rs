//! MLLP framing (HL7 v2 Implementation Guide, appendix C): a message is
//! `0x0B` (start block), the message bytes, then `0x1C 0x0D` (end block).
//!
//! The reader never holds more than the maximum message size plus one read
//! buffer: a frame that grows past the limit is refused as soon as it does,
//! with the head of what arrived kept so the refusal can still name the
//! message's control id. Carriage returns and line feeds between frames are
//! tolerated (some senders add them); any other byte outside a frame is a
//! framing error.

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Start block.
pub const START: u8 = 0x0B;
/// End block, first byte.
pub const END: u8 = 0x1C;
/// End block, second byte.
pub const CR: u8 = 0x0D;

/// How much of an oversized frame is kept (enough for its MSH).
const HEAD: usize = 2048;
/// One read.
const CHUNK: usize = 8192;

/// Why no message could be read.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The frame grew past the limit; `head` is its first bytes.
    #[error("message over the {max}-byte limit")]
    TooLarge {
        /// The limit.
        max: usize,
        /// The first bytes of the frame (for its MSH).
        head: Vec<u8>,
    },
    /// Bytes outside a frame, or an end block not followed by a carriage return.
    #[error("malformed MLLP frame: {0}")]
    Malformed(&'static str),
    /// The connection closed in the middle of a frame.
    #[error("connection closed inside a frame")]
    Truncated,
    /// The connection failed.
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// Reads framed messages from one connection.
#[derive(Debug)]
pub struct FrameReader {
    buf: Vec<u8>,
    max: usize,
    /// How much of the frame in `buf` is known to hold no end block, so
    /// that each read searches only what it added: a frame sent a byte at
    /// a time would otherwise be scanned whole after every byte (quadratic
    /// in its size).
    scanned: usize,
}

impl FrameReader {
    /// A reader refusing messages over `max` bytes.
    #[must_use]
    pub fn new(max: usize) -> Self {
        Self {
            buf: Vec::new(),
            max,
            scanned: 0,
        }
    }

    /// The next message, or `None` when the peer closed between frames.
    ///
    /// # Errors
    /// See [`FrameError`]; after one, the connection cannot be read further.
    pub async fn next<R: AsyncRead + Unpin>(
        &mut self,
        r: &mut R,
    ) -> Result<Option<Vec<u8>>, FrameError> {
        let mut chunk = vec![0u8; CHUNK];
        loop {
            if let Some(message) = self.take()? {
                return Ok(Some(message));
            }
            let n = r.read(&mut chunk).await?;
            if n == 0 {
                return if self.buf.iter().all(|b| matches!(b, b'\r' | b'\n')) {
                    Ok(None)
                } else {
                    Err(FrameError::Truncated)
                };
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    /// A whole message from the buffer, if one is there.
    fn take(&mut self) -> Result<Option<Vec<u8>>, FrameError> {
        let Some(start) = self.buf.iter().position(|b| !matches!(b, b'\r' | b'\n')) else {
            self.buf.clear();
            self.scanned = 0;
            return Ok(None);
        };
        if start > 0 {
            // Line ends between frames: gone, so the frame starts the buffer.
            self.buf.drain(..start);
            self.scanned = 0;
        }
        if self.buf[0] != START {
            return Err(FrameError::Malformed("data outside a frame"));
        }
        let body = &self.buf[1..];
        let from = self.scanned.min(body.len());
        let Some(end) = memchr::memchr(END, &body[from..]).map(|i| from + i) else {
            self.scanned = body.len();
            if body.len() > self.max {
                return Err(self.too_large(0));
            }
            return Ok(None);
        };
        if end > self.max {
            return Err(self.too_large(0));
        }
        match body.get(end + 1) {
            None => {
                self.scanned = end;
                Ok(None)
            }
            Some(&CR) => {
                let message = body[..end].to_vec();
                self.buf.drain(..1 + end + 2);
                self.scanned = 0;
                Ok(Some(message))
            }
            Some(_) => Err(FrameError::Malformed("end block 0x1C not followed by 0x0D")),
        }
    }

    fn too_large(&mut self, start: usize) -> FrameError {
        let body = &self.buf[start + 1..];
        FrameError::TooLarge {
            max: self.max,
            head: body[..body.len().min(HEAD)].to_vec(),
        }
    }
}

/// Writes `message` as one frame and flushes it.
///
/// # Errors
/// The connection failed.
pub async fn write<W: AsyncWrite + Unpin>(w: &mut W, message: &[u8]) -> std::io::Result<()> {
    let mut framed = Vec::with_capacity(message.len() + 3);
    framed.push(START);
    framed.extend_from_slice(message);
    framed.extend_from_slice(&[END, CR]);
    w.write_all(&framed).await?;
    w.flush().await
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn read_all(input: &[u8], max: usize) -> (Vec<Vec<u8>>, Option<FrameError>) {
        let mut r = FrameReader::new(max);
        let mut input = input;
        let mut out = Vec::new();
        loop {
            match r.next(&mut input).await {
                Ok(Some(m)) => out.push(m),
                Ok(None) => return (out, None),
                Err(e) => return (out, Some(e)),
            }
        }
    }

    #[tokio::test]
    async fn frames_are_read_back_to_back_and_split_across_reads() {
        let (got, err) = read_all(b"\x0bA\rB\x1c\x0d\r\n\x0bC\x1c\x0d", 100).await;
        assert_eq!(got, [b"A\rB".to_vec(), b"C".to_vec()]);
        assert!(err.is_none());
        // One byte at a time.
        let (client, mut server) = tokio::io::duplex(1);
        let writer = tokio::spawn(async move {
            let mut client = client;
            write(&mut client, b"MSH|x").await.unwrap();
        });
        let mut r = FrameReader::new(100);
        assert_eq!(r.next(&mut server).await.unwrap().unwrap(), b"MSH|x");
        writer.await.unwrap();
        assert!(r.next(&mut server).await.unwrap().is_none());
    }

    #[tokio::test]
    async fn bad_frames_are_refused() {
        let (_, err) = read_all(b"MSH|no frame", 100).await;
        assert!(matches!(err, Some(FrameError::Malformed(_))), "{err:?}");
        let (_, err) = read_all(b"\x0bA\x1cX", 100).await;
        assert!(matches!(err, Some(FrameError::Malformed(_))), "{err:?}");
        let (_, err) = read_all(b"\x0bA", 100).await;
        assert!(matches!(err, Some(FrameError::Truncated)), "{err:?}");
        // Over the limit: refused without waiting for the end, head kept.
        let mut big = vec![START];
        big.extend_from_slice(b"MSH|");
        big.extend(std::iter::repeat_n(b'x', 200));
        let (_, err) = read_all(&big, 100).await;
        match err {
            Some(FrameError::TooLarge { max, head }) => {
                assert_eq!(max, 100);
                assert!(head.starts_with(b"MSH|"));
            }
            other => panic!("{other:?}"),
        }
        // Exactly the limit is fine; one more byte is not.
        let mut exact = vec![START];
        exact.extend(std::iter::repeat_n(b'x', 100));
        exact.extend_from_slice(&[END, CR]);
        assert_eq!(read_all(&exact, 100).await.0.len(), 1);
        assert!(read_all(&exact, 99).await.1.is_some());
    }
}

#[cfg(test)]
/// A frame arriving a byte at a time (what the scan offset is for).
mod byte_at_a_time {
    use super::*;
    use std::pin::Pin;
    use std::task::{Context, Poll};

    /// Gives its bytes one at a time, one per read.
    struct Trickle(Vec<u8>, usize);

    impl AsyncRead for Trickle {
        fn poll_read(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &mut tokio::io::ReadBuf<'_>,
        ) -> Poll<std::io::Result<()>> {
            if let Some(&b) = self.0.get(self.1) {
                buf.put_slice(&[b]);
                self.1 += 1;
            }
            Poll::Ready(Ok(()))
        }
    }

    fn framed(message: &[u8]) -> Vec<u8> {
        let mut f = vec![START];
        f.extend_from_slice(message);
        f.extend_from_slice(&[END, CR]);
        f
    }

    #[tokio::test]
    async fn frames_sent_a_byte_at_a_time_are_read_whole_and_in_order() {
        let first = vec![b'a'; 200_000];
        let second = b"MSH|^~\\&|second".to_vec();
        let mut bytes = framed(&first);
        bytes.extend_from_slice(b"\r\n");
        bytes.extend(framed(&second));
        bytes.extend(framed(b""));
        let mut from = Trickle(bytes, 0);
        let mut reader = FrameReader::new(300_000);
        assert_eq!(reader.next(&mut from).await.unwrap(), Some(first));
        assert_eq!(reader.next(&mut from).await.unwrap(), Some(second));
        assert_eq!(reader.next(&mut from).await.unwrap(), Some(Vec::new()));
        assert_eq!(reader.next(&mut from).await.unwrap(), None);
    }

    #[tokio::test]
    async fn an_end_block_split_from_its_carriage_return_still_ends_the_frame() {
        let mut bytes = framed(b"one");
        bytes.extend(framed(b"two"));
        let mut from = Trickle(bytes, 0);
        let mut reader = FrameReader::new(16);
        assert_eq!(reader.next(&mut from).await.unwrap(), Some(b"one".to_vec()));
        assert_eq!(reader.next(&mut from).await.unwrap(), Some(b"two".to_vec()));
        let mut long = Trickle(framed(&[b'x'; 17]), 0);
        let err = FrameReader::new(16).next(&mut long).await.unwrap_err();
        assert!(
            matches!(err, FrameError::TooLarge { max: 16, .. }),
            "{err:?}"
        );
    }
}
