//! The `data` column, written page by page without the Parquet column writer.
//!
//! Every row is one PLAIN data page (format v1). Its uncompressed bytes (definition
//! levels, the value's length, the value) are laid out in the row group's value buffer
//! by the cast stage, after room for the page header, so a page is compressed straight
//! from the buffer the cast filled, into one buffer for the whole chunk (again with
//! room for each header in front of its page). The column writer would first copy the
//! value into its encoder buffer, then into a page buffer, and only then compress: for
//! a 262 MB row, four copies alive at once where this keeps two (the cast row and its
//! compressed page), and with `--compression none` one, the cast buffer itself. Both
//! buffers come from the writer's pool and go back to it, so steady state allocates
//! nothing (fresh memory costs a page fault and the kernel's zeroing per page).
//!
//! The bytes are the ones the column writer writes for the same rows under
//! [`super::writer_properties`] (one row per page, PLAIN, no statistics, an offset
//! index): `tests/convert.rs` rebuilds converted files with the column writer and
//! compares them byte for byte, for every codec.

use std::collections::VecDeque;
use std::io::{Cursor, Read};
use std::ops::Range;
use std::sync::Arc;

use bytes::Bytes;
use parquet::basic::{Compression, Encoding, EncodingMask, PageType};
use parquet::column::writer::ColumnCloseResult;
use parquet::errors::{ParquetError, Result as PqResult};
use parquet::file::metadata::{ColumnChunkMetaData, OffsetIndexBuilder, PageEncodingStats};
use parquet::file::reader::{ChunkReader, Length};
use parquet::schema::types::ColumnDescPtr;

/// Bytes before each value in its page: the definition levels (their 4-byte length,
/// then one RLE run: count 1, value 1) and the value's 4-byte length.
pub(super) const PAGE_PREFIX: usize = 10;

/// Room kept in front of every page for its header (at most 29 bytes are used).
pub(super) const HEADER_ROOM: usize = 32;

/// Bytes a page takes in the cast buffer before its value.
pub(super) const PAGE_LEAD: usize = HEADER_ROOM + PAGE_PREFIX;

/// Writes the page prefix of a value of `len` bytes into `dst[..PAGE_PREFIX]`.
pub(super) fn write_prefix(dst: &mut [u8], len: u32) {
    dst[..6].copy_from_slice(&[2, 0, 0, 0, 2, 1]);
    dst[6..PAGE_PREFIX].copy_from_slice(&len.to_le_bytes());
}

/// The Thrift compact encoding of a v1 data page header for one PLAIN value with RLE
/// levels and no statistics or CRC, as the column writer writes it.
fn page_header(uncompressed: i32, compressed: i32) -> ([u8; HEADER_ROOM], usize) {
    struct Out([u8; HEADER_ROOM], usize);
    impl Out {
        fn byte(&mut self, b: u8) {
            self.0[self.1] = b;
            self.1 += 1;
        }
        /// A field header (id delta 1, type i32) and the zigzag varint of `v`.
        fn i32_field(&mut self, v: i32) {
            self.byte(0x15);
            let mut z = ((v << 1) ^ (v >> 31)) as u32;
            while z >= 0x80 {
                self.byte((z & 0x7f) as u8 | 0x80);
                z >>= 7;
            }
            self.byte(z as u8);
        }
    }
    let mut out = Out([0; HEADER_ROOM], 0);
    out.i32_field(PageType::DATA_PAGE as i32); // 1: type
    out.i32_field(uncompressed); // 2: uncompressed_page_size
    out.i32_field(compressed); // 3: compressed_page_size
    out.byte(0x2c); // 5: data_page_header, a struct (id delta 2, type 12)
    out.i32_field(1); //   1: num_values
    out.i32_field(Encoding::PLAIN as i32); //   2: encoding
    out.i32_field(Encoding::RLE as i32); //   3: definition_level_encoding
    out.i32_field(Encoding::RLE as i32); //   4: repetition_level_encoding
    out.byte(0); //   end of data_page_header
    out.byte(0); // end of the page header
    (out.0, out.1)
}

thread_local! {
    /// This thread's page compressor, kept from one row group to the next: a zstd
    /// context holds megabytes of tables, which a fresh context allocates (and the
    /// kernel zeroes) again.
    static CODEC: std::cell::RefCell<Option<(Compression, PageCodec)>> =
        const { std::cell::RefCell::new(None) };
}

/// Runs `f` with this thread's compressor for `compression`, made on first use (a
/// fresh one if `f` re-enters).
pub(super) fn with_codec<R>(
    compression: Compression,
    f: impl FnOnce(&mut PageCodec) -> R,
) -> std::io::Result<R> {
    CODEC.with(|cell| {
        let Ok(mut slot) = cell.try_borrow_mut() else {
            return Ok(f(&mut PageCodec::new(compression)?));
        };
        let codec = match &mut *slot {
            Some((c, codec)) if *c == compression => codec,
            other => &mut other.insert((compression, PageCodec::new(compression)?)).1,
        };
        Ok(f(codec))
    })
}

/// A page compressor with the parquet crate's settings for each codec.
pub(super) enum PageCodec {
    None,
    /// The compressor, the configured level and the level it is set to now.
    Zstd(zstd::bulk::Compressor<'static>, i32, i32),
    Lz4Raw,
    Snappy(Box<snap::raw::Encoder>),
}

/// The zstd level of a page of V2 codes (int8, int2) when the configured level is
/// `level`: 1 for levels 2 to 18, else `level`. Code bytes take few values and hold
/// almost no repeats, so zstd's work is its entropy coder: matching harder only costs
/// time and, with the matches' overhead, bytes. Measured with `zstd -T1` on 300 MB of
/// carried NVFP4 codes (with their scales): level 1 115.4 MB in 0.75 s, 2 116.0 MB,
/// 3 119.6 MB in 1.79 s, 5 121.7 MB, 9 122.1 MB, 12 121.3 MB in 19 s; on 50 MB, 19 was
/// 3 % smaller than 1 at 370 times its time. On int8 codes quantized from bf16 weights
/// (near-uniform bytes), levels 1 and 3 gave the same size (0.04 % apart) and time.
/// Fast (negative) levels and levels from 19 apply as given.
pub(crate) fn code_level(level: i32) -> i32 {
    if (2..=18).contains(&level) {
        1
    } else {
        level
    }
}

impl PageCodec {
    /// The compressor for `compression`; `None` for codecs the writer never uses.
    pub(super) fn new(compression: Compression) -> std::io::Result<PageCodec> {
        Ok(match compression {
            Compression::UNCOMPRESSED => PageCodec::None,
            Compression::ZSTD(level) => {
                let l = level.compression_level();
                PageCodec::Zstd(zstd::bulk::Compressor::new(l)?, l, l)
            }
            Compression::LZ4_RAW => PageCodec::Lz4Raw,
            Compression::SNAPPY => PageCodec::Snappy(Box::new(snap::raw::Encoder::new())),
            other => {
                return Err(std::io::Error::other(format!(
                    "page codec {other} is not one the writer uses"
                )))
            }
        })
    }

    /// At most how many bytes `n` bytes compress to.
    pub(super) fn bound(&self, n: usize) -> usize {
        match self {
            PageCodec::None => n,
            PageCodec::Zstd(..) => zstd::zstd_safe::compress_bound(n),
            PageCodec::Lz4Raw => lz4_flex::block::get_maximum_output_size(n),
            PageCodec::Snappy(_) => snap::raw::max_compress_len(n),
        }
    }

    /// Appends `page`, compressed, to `out`; `codes` when the page holds V2 codes
    /// (zstd compresses those at [`code_level`]).
    fn compress_into(
        &mut self,
        page: &[u8],
        out: &mut Vec<u8>,
        codes: bool,
    ) -> std::io::Result<()> {
        let at = out.len();
        let bound = self.bound(page.len());
        match self {
            PageCodec::None => out.extend_from_slice(page),
            PageCodec::Zstd(c, level, now) => {
                let want = if codes { code_level(*level) } else { *level };
                if want != *now {
                    c.set_compression_level(want)?;
                    *now = want;
                }
                out.reserve(bound);
                let mut cursor = Cursor::new(out);
                cursor.set_position(at as u64);
                c.compress_to_buffer(page, &mut cursor)?;
            }
            PageCodec::Lz4Raw => {
                out.resize(at + bound, 0);
                let n = lz4_flex::block::compress_into(page, &mut out[at..])
                    .map_err(std::io::Error::other)?;
                out.truncate(at + n);
            }
            PageCodec::Snappy(e) => {
                out.resize(at + bound, 0);
                let n = e.compress(page, &mut out[at..])?;
                out.truncate(at + n);
            }
        }
        Ok(())
    }
}

/// Builds the `data` column chunk of one row group, one page per row, in one buffer.
pub(super) struct DataChunkBuilder {
    descr: ColumnDescPtr,
    compression: Compression,
    buf: Vec<u8>,
    /// Each page (its header and bytes) in `buf`, in order.
    ranges: Vec<Range<usize>>,
    len: u64,
    uncompressed: u64,
    offsets: OffsetIndexBuilder,
    pages: usize,
}

impl DataChunkBuilder {
    /// A chunk whose pages are compressed into `buf` (emptied; its capacity is reused).
    pub(super) fn new(descr: ColumnDescPtr, compression: Compression, mut buf: Vec<u8>) -> Self {
        buf.clear();
        DataChunkBuilder {
            descr,
            compression,
            buf,
            ranges: Vec::new(),
            len: 0,
            uncompressed: 0,
            offsets: OffsetIndexBuilder::new(),
            pages: 0,
        }
    }

    /// Compresses the page of one row into the chunk: `page` is its prefix and value,
    /// `PAGE_PREFIX` bytes longer than the value; `codes` when the value is V2 codes.
    pub(super) fn push(&mut self, codec: &mut PageCodec, page: &[u8], codes: bool) -> PqResult<()> {
        let room = self.buf.len();
        self.buf.resize(room + HEADER_ROOM, 0);
        codec.compress_into(page, &mut self.buf, codes)?;
        let compressed = self.buf.len() - room - HEADER_ROOM;
        self.place(room, compressed, page.len())
    }

    /// The chunk of uncompressed pages that are already in `buf`: each of `pages` is
    /// [`HEADER_ROOM`] bytes of room, then the page's prefix and value. No byte moves.
    pub(super) fn uncompressed(
        descr: ColumnDescPtr,
        compression: Compression,
        buf: Vec<u8>,
        pages: &[Range<usize>],
    ) -> PqResult<Self> {
        let mut chunk = DataChunkBuilder {
            buf,
            ..DataChunkBuilder::new(descr, compression, Vec::new())
        };
        for p in pages {
            let n = p.len() - HEADER_ROOM;
            chunk.place(p.start, n, n)?;
        }
        Ok(chunk)
    }

    /// Writes the header of the page after the room at `room` into the end of that
    /// room and records the page.
    fn place(&mut self, room: usize, compressed: usize, uncompressed: usize) -> PqResult<()> {
        let (header, h) = page_header_for(uncompressed, compressed)?;
        let start = room + HEADER_ROOM - h;
        self.buf[start..room + HEADER_ROOM].copy_from_slice(&header[..h]);
        self.ranges.push(start..room + HEADER_ROOM + compressed);
        self.record(h, compressed, uncompressed);
        Ok(())
    }

    /// Accounts for a page of `header` + `compressed` bytes holding `uncompressed`
    /// bytes, as the column writer's page metrics and offset index do.
    fn record(&mut self, header: usize, compressed: usize, uncompressed: usize) {
        let page = (header + compressed) as u64;
        // Sizes fit i32: `page_header_for` checked them.
        self.offsets
            .append_offset_and_size(self.len as i64, page as i32);
        self.offsets.append_row_count(1);
        self.offsets
            .append_unencoded_byte_array_data_bytes(Some((uncompressed - PAGE_PREFIX) as i64));
        self.len += page;
        self.uncompressed += (header + uncompressed) as u64;
        self.pages += 1;
    }

    /// The finished chunk and what the row group writer needs to splice it.
    pub(super) fn finish(self) -> PqResult<DataChunk> {
        let stats = vec![PageEncodingStats {
            page_type: PageType::DATA_PAGE,
            encoding: Encoding::PLAIN,
            count: self.pages as i32,
        }];
        let metadata = ColumnChunkMetaData::builder(self.descr)
            .set_compression(self.compression)
            .set_encodings_mask(EncodingMask::new_from_encodings(
                [Encoding::PLAIN, Encoding::RLE].iter(),
            ))
            .set_page_encoding_stats(stats)
            .set_total_compressed_size(self.len as i64)
            .set_total_uncompressed_size(self.uncompressed as i64)
            .set_num_values(self.pages as i64)
            .set_data_page_offset(0)
            .set_dictionary_page_offset(None)
            .build()?;
        Ok(DataChunk {
            pages: Pages {
                buf: Arc::new(self.buf),
                ranges: self.ranges,
                len: self.len,
            },
            close: ColumnCloseResult {
                bytes_written: self.len,
                rows_written: self.pages as u64,
                metadata,
                bloom_filter: None,
                column_index: None,
                offset_index: Some(self.offsets.build()),
            },
        })
    }
}

fn page_header_for(uncompressed: usize, compressed: usize) -> PqResult<([u8; HEADER_ROOM], usize)> {
    let size = |n: usize, what: &str| {
        i32::try_from(n)
            .map_err(|_| ParquetError::General(format!("page {what} size overflow: {n}")))
    };
    Ok(page_header(
        size(uncompressed, "uncompressed")?,
        size(compressed, "compressed")?,
    ))
}

/// The `data` column chunk of a row group: its pages and its metadata.
pub(super) struct DataChunk {
    pub(super) pages: Pages,
    pub(super) close: ColumnCloseResult,
}

/// A column chunk's pages, ranges of one buffer, read back in order.
pub(super) struct Pages {
    buf: Arc<Vec<u8>>,
    ranges: Vec<Range<usize>>,
    len: u64,
}

impl Pages {
    /// The buffer, for reuse, once nothing reads it any more.
    pub(super) fn into_buffer(self) -> Option<Vec<u8>> {
        Arc::try_unwrap(self.buf).ok()
    }
}

impl Length for Pages {
    fn len(&self) -> u64 {
        self.len
    }
}

impl ChunkReader for Pages {
    type T = PagesRead;

    fn get_read(&self, start: u64) -> PqResult<PagesRead> {
        let mut read = PagesRead {
            buf: self.buf.clone(),
            ranges: self.ranges.iter().cloned().collect(),
        };
        let mut skip = start;
        while skip > 0 {
            let Some(front) = read.ranges.front_mut() else {
                return Err(ParquetError::EOF(format!("offset {start} past the chunk")));
            };
            let n = skip.min(front.len() as u64) as usize;
            front.start += n;
            skip -= n as u64;
            if front.start >= front.end {
                read.ranges.pop_front();
            }
        }
        Ok(read)
    }

    fn get_bytes(&self, start: u64, length: usize) -> PqResult<Bytes> {
        let mut out = Vec::with_capacity(length);
        self.get_read(start)?
            .take(length as u64)
            .read_to_end(&mut out)?;
        if out.len() != length {
            return Err(ParquetError::EOF(format!(
                "{length} bytes at {start} past the chunk"
            )));
        }
        Ok(out.into())
    }
}

/// Reads [`Pages`] from an offset.
pub(super) struct PagesRead {
    buf: Arc<Vec<u8>>,
    ranges: VecDeque<Range<usize>>,
}

impl Read for PagesRead {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        while let Some(front) = self.ranges.front_mut() {
            if front.start >= front.end {
                self.ranges.pop_front();
                continue;
            }
            let n = out.len().min(front.len());
            out[..n].copy_from_slice(&self.buf[front.start..front.start + n]);
            front.start += n;
            return Ok(n);
        }
        Ok(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use parquet::basic::ZstdLevel;

    #[test]
    fn code_pages_take_level_1_between_2_and_18() {
        assert_eq!(code_level(1), 1);
        assert_eq!(code_level(2), 1);
        assert_eq!(code_level(3), 1);
        assert_eq!(code_level(18), 1);
        assert_eq!(code_level(19), 19);
        assert_eq!(code_level(22), 22);
        assert_eq!(code_level(-5), -5);
    }

    /// One compressor alternating between code pages and float pages gives each the
    /// bytes of a fresh compressor at its own level, and they decompress to the page.
    #[test]
    fn one_compressor_switches_levels_page_by_page() {
        let codes: Vec<u8> = (0..200_000u32)
            .map(|i| ((i.wrapping_mul(2_654_435_761) >> 28) as u8).wrapping_sub(8))
            .collect();
        let floats: Vec<u8> = (0..200_000u32)
            .flat_map(|i| half::f16::from_f32((i as f32 * 0.37).sin()).to_le_bytes())
            .collect();
        let mut codec = PageCodec::new(Compression::ZSTD(ZstdLevel::try_new(3).unwrap())).unwrap();
        for (page, is_codes) in [
            (&codes, true),
            (&floats, false),
            (&codes, true),
            (&floats, false),
        ] {
            let mut out = Vec::new();
            codec.compress_into(page, &mut out, is_codes).unwrap();
            let level = if is_codes { 1 } else { 3 };
            assert_eq!(
                out,
                zstd::bulk::compress(page, level).unwrap(),
                "codes {is_codes}"
            );
            assert_eq!(&zstd::bulk::decompress(&out, page.len()).unwrap(), page);
        }
    }
}
