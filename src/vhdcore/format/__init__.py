"""The VHD format as data: field tables and parses (structs), limits and validity rules (rules), parent locators
(locators), the layout writers share (layout), CHS geometry. No file is opened here: bytes in, structures or
bytes out (layout writes to a descriptor it is given)."""
