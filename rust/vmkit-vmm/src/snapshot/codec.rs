//! The byte encoding of snapshot files: little-endian integers and
//! length-prefixed blobs. A snapshot is user input, so the reader checks
//! every length against what is left and against a caller's limit before
//! it takes anything.

use super::SnapshotError;

/// Appends values to a buffer.
#[derive(Default)]
pub struct Writer {
    pub bytes: Vec<u8>,
}

impl Writer {
    pub fn u16(&mut self, value: u16) {
        self.bytes.extend_from_slice(&value.to_le_bytes());
    }

    pub fn u32(&mut self, value: u32) {
        self.bytes.extend_from_slice(&value.to_le_bytes());
    }

    pub fn u64(&mut self, value: u64) {
        self.bytes.extend_from_slice(&value.to_le_bytes());
    }

    /// A list of u32: its length (u32), then its values.
    pub fn u32_list(&mut self, values: &[u32]) {
        self.u32(values.len() as u32);
        for &value in values {
            self.u32(value);
        }
    }

    /// A blob: its length (u32), then its bytes.
    pub fn blob(&mut self, data: &[u8]) {
        // Every blob vmkit writes is a KVM structure or table: far below 4 GiB.
        self.u32(data.len() as u32);
        self.bytes.extend_from_slice(data);
    }
}

/// Takes values from a buffer, refusing any that would run past its end.
pub struct Reader<'a> {
    what: &'a str,
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    /// Reads `bytes`, which errors call `what`.
    pub fn new(what: &'a str, bytes: &'a [u8]) -> Self {
        Reader { what, bytes, at: 0 }
    }

    fn take(&mut self, len: usize) -> Result<&'a [u8], SnapshotError> {
        let end = self
            .at
            .checked_add(len)
            .filter(|&end| end <= self.bytes.len())
            .ok_or_else(|| self.corrupt(format!("truncated at byte {}", self.at)))?;
        let slice = &self.bytes[self.at..end];
        self.at = end;
        Ok(slice)
    }

    pub fn byte(&mut self) -> Result<u8, SnapshotError> {
        Ok(self.take(1)?[0])
    }

    pub fn u16(&mut self) -> Result<u16, SnapshotError> {
        let mut raw = [0u8; 2];
        raw.copy_from_slice(self.take(2)?);
        Ok(u16::from_le_bytes(raw))
    }

    pub fn u32(&mut self) -> Result<u32, SnapshotError> {
        let mut raw = [0u8; 4];
        raw.copy_from_slice(self.take(4)?);
        Ok(u32::from_le_bytes(raw))
    }

    pub fn u64(&mut self) -> Result<u64, SnapshotError> {
        let mut raw = [0u8; 8];
        raw.copy_from_slice(self.take(8)?);
        Ok(u64::from_le_bytes(raw))
    }

    /// A count written by the saving VM that must equal the restoring VM's
    /// own (`owner` has `expected` `items`).
    pub fn count(
        &mut self,
        expected: usize,
        items: &str,
        owner: &str,
    ) -> Result<usize, SnapshotError> {
        let count = self.u32()? as usize;
        if count != expected {
            return Err(self.corrupt(format!("{count} {items}, {owner} has {expected}")));
        }
        Ok(count)
    }

    /// A list written by `Writer::u32_list`, of at most `limit` values.
    pub fn u32_list(&mut self, limit: usize) -> Result<Vec<u32>, SnapshotError> {
        let len = self.u32()? as usize;
        if len > limit {
            return Err(self.corrupt(format!("a list of {len} values (at most {limit})")));
        }
        (0..len).map(|_| self.u32()).collect()
    }

    /// A blob of at most `limit` bytes.
    pub fn blob(&mut self, limit: usize) -> Result<&'a [u8], SnapshotError> {
        let len = self.u32()? as usize;
        if len > limit {
            return Err(self.corrupt(format!("a field of {len} bytes (at most {limit})")));
        }
        self.take(len)
    }

    /// A blob that is exactly one `T`, any bit pattern of which is a `T`.
    pub fn value<T: zerocopy::FromBytes>(&mut self, field: &str) -> Result<T, SnapshotError> {
        let size = std::mem::size_of::<T>();
        let data = self.blob(size)?;
        T::read_from_bytes(data)
            .map_err(|_| self.corrupt(format!("{field} is {} bytes, not {size}", data.len())))
    }

    /// The reader is at the end; trailing bytes mean a corrupt file.
    pub fn finish(&self) -> Result<(), SnapshotError> {
        if self.at == self.bytes.len() {
            Ok(())
        } else {
            Err(self.corrupt(format!(
                "{} unexpected bytes at the end",
                self.bytes.len() - self.at
            )))
        }
    }

    pub fn corrupt(&self, detail: String) -> SnapshotError {
        SnapshotError::Corrupt {
            what: self.what.to_owned(),
            detail,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_round_trip_and_lengths_are_checked() {
        let mut w = Writer::default();
        w.u32(7);
        w.u64(u64::MAX);
        w.blob(&[1, 2, 3]);
        w.blob(&5u32.to_le_bytes());
        let mut r = Reader::new("test", &w.bytes);
        assert_eq!(r.u32().unwrap(), 7);
        assert_eq!(r.u64().unwrap(), u64::MAX);
        assert_eq!(r.blob(3).unwrap(), &[1, 2, 3]);
        assert_eq!(r.value::<u32>("five").unwrap(), 5);
        r.finish().unwrap();
    }

    #[test]
    fn hostile_lengths_are_refused() {
        // A blob claiming 4 GiB in a 12-byte file.
        let mut w = Writer::default();
        w.u32(u32::MAX);
        w.u64(0);
        let err = Reader::new("vcpu-0", &w.bytes)
            .blob(usize::MAX)
            .unwrap_err();
        assert!(err.to_string().contains("truncated"), "{err}");
        // Over the caller's limit.
        let mut w = Writer::default();
        w.blob(&[0; 16]);
        let err = Reader::new("vcpu-0", &w.bytes).blob(8).unwrap_err();
        assert!(err.to_string().contains("at most 8"), "{err}");
        // A value of the wrong size.
        let mut w = Writer::default();
        w.blob(&[0; 3]);
        let err = Reader::new("vcpu-0", &w.bytes)
            .value::<u32>("lapic")
            .unwrap_err();
        assert!(err.to_string().contains("lapic is 3 bytes, not 4"), "{err}");
        // Trailing bytes.
        let mut r = Reader::new("vcpu-0", &[0, 0, 0, 0, 9]);
        r.u32().unwrap();
        assert!(r.finish().is_err());
    }
}
