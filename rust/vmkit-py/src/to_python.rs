//! A serde `Serializer` that builds Python objects directly: structs become
//! instances of the registered Python dataclass of the same name (built
//! without running `__init__`), so a parsed config reaches Python in one pass.

use std::fmt;

use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList, PyString, PyType};
use serde::ser::{self, Serialize};

#[derive(Debug)]
pub struct SerError(pub String);

impl fmt::Display for SerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for SerError {}

impl ser::Error for SerError {
    fn custom<T: fmt::Display>(msg: T) -> Self {
        SerError(msg.to_string())
    }
}

impl From<std::convert::Infallible> for SerError {
    fn from(never: std::convert::Infallible) -> Self {
        match never {}
    }
}

impl From<PyErr> for SerError {
    fn from(e: PyErr) -> Self {
        SerError(e.to_string())
    }
}

type Result<T> = std::result::Result<T, SerError>;

/// Struct name → Python class.
#[derive(Clone, Copy)]
pub struct ToPython<'a, 'py> {
    py: Python<'py>,
    classes: &'a Bound<'py, PyDict>,
    object_new: &'a Bound<'py, PyAny>,
}

impl<'a, 'py> ToPython<'a, 'py> {
    pub fn new(
        py: Python<'py>,
        classes: &'a Bound<'py, PyDict>,
        object_new: &'a Bound<'py, PyAny>,
    ) -> Self {
        ToPython {
            py,
            classes,
            object_new,
        }
    }

    pub fn convert<T: Serialize + ?Sized>(self, value: &T) -> Result<Bound<'py, PyAny>> {
        value.serialize(self)
    }

    fn instance(&self, name: &str, fields: Bound<'py, PyDict>) -> Result<Bound<'py, PyAny>> {
        match self.classes.get_item(name)? {
            Some(class) => {
                let class = class.cast_into::<PyType>().map_err(PyErr::from)?;
                let object = self.object_new.call1((class,))?;
                object.setattr(pyo3::intern!(self.py, "__dict__"), fields)?;
                Ok(object)
            }
            None => Ok(fields.into_any()),
        }
    }
}

pub struct SeqBuilder<'a, 'py> {
    to: ToPython<'a, 'py>,
    items: Vec<Bound<'py, PyAny>>,
}

pub struct StructBuilder<'a, 'py> {
    to: ToPython<'a, 'py>,
    name: &'static str,
    fields: Bound<'py, PyDict>,
}

pub struct MapBuilder<'a, 'py> {
    to: ToPython<'a, 'py>,
    map: Bound<'py, PyDict>,
    key: Option<Bound<'py, PyAny>>,
}

impl<'a, 'py> ser::Serializer for ToPython<'a, 'py> {
    type Ok = Bound<'py, PyAny>;
    type Error = SerError;
    type SerializeSeq = SeqBuilder<'a, 'py>;
    type SerializeTuple = SeqBuilder<'a, 'py>;
    type SerializeTupleStruct = SeqBuilder<'a, 'py>;
    type SerializeTupleVariant = ser::Impossible<Self::Ok, SerError>;
    type SerializeMap = MapBuilder<'a, 'py>;
    type SerializeStruct = StructBuilder<'a, 'py>;
    type SerializeStructVariant = ser::Impossible<Self::Ok, SerError>;

    fn serialize_bool(self, v: bool) -> Result<Self::Ok> {
        Ok(v.into_pyobject(self.py)?.to_owned().into_any())
    }
    fn serialize_i8(self, v: i8) -> Result<Self::Ok> {
        self.serialize_i64(v.into())
    }
    fn serialize_i16(self, v: i16) -> Result<Self::Ok> {
        self.serialize_i64(v.into())
    }
    fn serialize_i32(self, v: i32) -> Result<Self::Ok> {
        self.serialize_i64(v.into())
    }
    fn serialize_i64(self, v: i64) -> Result<Self::Ok> {
        Ok(v.into_pyobject(self.py)?.into_any())
    }
    fn serialize_u8(self, v: u8) -> Result<Self::Ok> {
        self.serialize_u64(v.into())
    }
    fn serialize_u16(self, v: u16) -> Result<Self::Ok> {
        self.serialize_u64(v.into())
    }
    fn serialize_u32(self, v: u32) -> Result<Self::Ok> {
        self.serialize_u64(v.into())
    }
    fn serialize_u64(self, v: u64) -> Result<Self::Ok> {
        Ok(v.into_pyobject(self.py)?.into_any())
    }
    fn serialize_f32(self, v: f32) -> Result<Self::Ok> {
        self.serialize_f64(v.into())
    }
    fn serialize_f64(self, v: f64) -> Result<Self::Ok> {
        Ok(v.into_pyobject(self.py)?.into_any())
    }
    fn serialize_char(self, v: char) -> Result<Self::Ok> {
        self.serialize_str(v.encode_utf8(&mut [0u8; 4]))
    }
    fn serialize_str(self, v: &str) -> Result<Self::Ok> {
        Ok(PyString::new(self.py, v).into_any())
    }
    fn serialize_bytes(self, v: &[u8]) -> Result<Self::Ok> {
        Ok(pyo3::types::PyBytes::new(self.py, v).into_any())
    }
    fn serialize_none(self) -> Result<Self::Ok> {
        Ok(self.py.None().into_bound(self.py))
    }
    fn serialize_some<T: Serialize + ?Sized>(self, value: &T) -> Result<Self::Ok> {
        value.serialize(self)
    }
    fn serialize_unit(self) -> Result<Self::Ok> {
        self.serialize_none()
    }
    fn serialize_unit_struct(self, _name: &'static str) -> Result<Self::Ok> {
        self.serialize_none()
    }
    fn serialize_unit_variant(
        self,
        _name: &'static str,
        _index: u32,
        variant: &'static str,
    ) -> Result<Self::Ok> {
        self.serialize_str(variant)
    }
    fn serialize_newtype_struct<T: Serialize + ?Sized>(
        self,
        _name: &'static str,
        value: &T,
    ) -> Result<Self::Ok> {
        value.serialize(self)
    }
    fn serialize_newtype_variant<T: Serialize + ?Sized>(
        self,
        _name: &'static str,
        _index: u32,
        variant: &'static str,
        value: &T,
    ) -> Result<Self::Ok> {
        let dict = PyDict::new(self.py);
        dict.set_item(variant, value.serialize(self)?)?;
        Ok(dict.into_any())
    }
    fn serialize_seq(self, len: Option<usize>) -> Result<Self::SerializeSeq> {
        Ok(SeqBuilder {
            to: self,
            items: Vec::with_capacity(len.unwrap_or(0)),
        })
    }
    fn serialize_tuple(self, len: usize) -> Result<Self::SerializeTuple> {
        self.serialize_seq(Some(len))
    }
    fn serialize_tuple_struct(
        self,
        _name: &'static str,
        len: usize,
    ) -> Result<Self::SerializeTupleStruct> {
        self.serialize_seq(Some(len))
    }
    fn serialize_tuple_variant(
        self,
        name: &'static str,
        _index: u32,
        _variant: &'static str,
        _len: usize,
    ) -> Result<Self::SerializeTupleVariant> {
        Err(SerError(format!("tuple variants of {name} are not supported")))
    }
    fn serialize_map(self, _len: Option<usize>) -> Result<Self::SerializeMap> {
        Ok(MapBuilder {
            to: self,
            map: PyDict::new(self.py),
            key: None,
        })
    }
    fn serialize_struct(self, name: &'static str, _len: usize) -> Result<Self::SerializeStruct> {
        Ok(StructBuilder {
            to: self,
            name,
            fields: PyDict::new(self.py),
        })
    }
    fn serialize_struct_variant(
        self,
        name: &'static str,
        _index: u32,
        _variant: &'static str,
        _len: usize,
    ) -> Result<Self::SerializeStructVariant> {
        Err(SerError(format!("struct variants of {name} are not supported")))
    }
}

impl<'a, 'py> SeqBuilder<'a, 'py> {
    fn push<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<()> {
        self.items.push(value.serialize(self.to)?);
        Ok(())
    }
    fn finish(self) -> Result<Bound<'py, PyAny>> {
        Ok(PyList::new(self.to.py, self.items)?.into_any())
    }
}

impl<'a, 'py> ser::SerializeSeq for SeqBuilder<'a, 'py> {
    type Ok = Bound<'py, PyAny>;
    type Error = SerError;
    fn serialize_element<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<()> {
        self.push(value)
    }
    fn end(self) -> Result<Self::Ok> {
        self.finish()
    }
}

impl<'a, 'py> ser::SerializeTuple for SeqBuilder<'a, 'py> {
    type Ok = Bound<'py, PyAny>;
    type Error = SerError;
    fn serialize_element<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<()> {
        self.push(value)
    }
    fn end(self) -> Result<Self::Ok> {
        self.finish()
    }
}

impl<'a, 'py> ser::SerializeTupleStruct for SeqBuilder<'a, 'py> {
    type Ok = Bound<'py, PyAny>;
    type Error = SerError;
    fn serialize_field<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<()> {
        self.push(value)
    }
    fn end(self) -> Result<Self::Ok> {
        self.finish()
    }
}

impl<'a, 'py> ser::SerializeMap for MapBuilder<'a, 'py> {
    type Ok = Bound<'py, PyAny>;
    type Error = SerError;
    fn serialize_key<T: Serialize + ?Sized>(&mut self, key: &T) -> Result<()> {
        self.key = Some(key.serialize(self.to)?);
        Ok(())
    }
    fn serialize_value<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<()> {
        let key = self
            .key
            .take()
            .ok_or_else(|| SerError("map value without a key".to_owned()))?;
        self.map.set_item(key, value.serialize(self.to)?)?;
        Ok(())
    }
    fn end(self) -> Result<Self::Ok> {
        Ok(self.map.into_any())
    }
}

impl<'a, 'py> ser::SerializeStruct for StructBuilder<'a, 'py> {
    type Ok = Bound<'py, PyAny>;
    type Error = SerError;
    fn serialize_field<T: Serialize + ?Sized>(
        &mut self,
        key: &'static str,
        value: &T,
    ) -> Result<()> {
        self.fields.set_item(key, value.serialize(self.to)?)?;
        Ok(())
    }
    fn end(self) -> Result<Self::Ok> {
        self.to.instance(self.name, self.fields)
    }
}
