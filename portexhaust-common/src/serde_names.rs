//! User space only: the codes travel in JSON by the names users see, never as numbers, so a
//! record stays readable when a code is renumbered or added.

use core::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer, de};

use crate::{Backend, Cause, Site, TcpState};

macro_rules! by_name {
    ($t:ty, $what:literal) => {
        impl Serialize for $t {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(self.name())
            }
        }

        impl<'de> Deserialize<'de> for $t {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                struct V;
                impl de::Visitor<'_> for V {
                    type Value = $t;
                    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                        f.write_str($what)
                    }
                    fn visit_str<E: de::Error>(self, v: &str) -> Result<$t, E> {
                        <$t>::from_name(v).ok_or_else(|| {
                            E::custom(format_args!(concat!("unknown ", $what, " {:?}"), v))
                        })
                    }
                }
                // deserialize_str, not _any: the same impl serves JSON map keys.
                d.deserialize_str(V)
            }
        }
    };
}

by_name!(Site, "kernel site");
by_name!(Cause, "cause");
by_name!(Backend, "backend");
by_name!(TcpState, "TCP state");
