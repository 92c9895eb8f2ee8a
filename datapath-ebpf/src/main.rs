//! The normal build of the datapath programs.
#![no_std]
#![no_main]

datapath_ebpf::programs!(log = false);
