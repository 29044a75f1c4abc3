//! Unit tests of the codec: every option and command, and the malformed inputs each
//! decoder must refuse.

use super::*;

fn opt_data(parts: &[&[u8]]) -> Vec<u8> {
    parts.concat()
}

fn info_payload(name: &str, reqs: &[u16]) -> Vec<u8> {
    let mut v = (name.len() as u32).to_be_bytes().to_vec();
    v.extend_from_slice(name.as_bytes());
    v.extend_from_slice(&(reqs.len() as u16).to_be_bytes());
    for r in reqs {
        v.extend_from_slice(&r.to_be_bytes());
    }
    v
}

fn meta_payload(export: &str, queries: &[&str]) -> Vec<u8> {
    let mut v = (export.len() as u32).to_be_bytes().to_vec();
    v.extend_from_slice(export.as_bytes());
    v.extend_from_slice(&(queries.len() as u32).to_be_bytes());
    for q in queries {
        v.extend_from_slice(&(q.len() as u32).to_be_bytes());
        v.extend_from_slice(q.as_bytes());
    }
    v
}

fn params() -> TransmissionParams {
    TransmissionParams {
        size: 1 << 20,
        read_only: false,
        max_payload: 32 << 20,
        structured: true,
        meta_contexts: 1,
    }
}

fn req(command: Command, flags: u16, offset: u64, length: u32) -> Request {
    Request { flags, command, handle: 7, offset, length }
}

// ----- handshake ---------------------------------------------------------------------

#[test]
fn greeting_has_both_magics_and_flags() {
    let g = encode_greeting(NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES);
    assert_eq!(&g[..8], b"NBDMAGIC");
    assert_eq!(&g[8..16], b"IHAVEOPT");
    assert_eq!(decode_greeting(&g), Ok(3));
    let mut bad = g;
    bad[0] = b'X';
    assert!(matches!(decode_greeting(&bad), Err(DecodeError::BadMagic { .. })));
    assert!(matches!(decode_greeting(&g[..10]), Err(DecodeError::Truncated { need: 18, have: 10 })));
}

#[test]
fn client_flags_accept_offered_bits_only() {
    let offered = NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES;
    assert_eq!(
        decode_client_flags(&[0, 0, 0, 3], offered),
        Ok(ClientFlags { fixed_newstyle: true, no_zeroes: true })
    );
    assert_eq!(decode_client_flags(&[0, 0, 0, 0], offered), Ok(ClientFlags::default()));
    assert_eq!(decode_client_flags(&[0, 0, 0, 4], offered), Err(DecodeError::UnknownClientFlags(4)));
    assert_eq!(
        decode_client_flags(&[0x80, 0, 0, 1], offered),
        Err(DecodeError::UnknownClientFlags(0x8000_0001))
    );
    // NO_ZEROES from the client is refused when the server did not offer it.
    assert_eq!(
        decode_client_flags(&[0, 0, 0, 2], NBD_FLAG_FIXED_NEWSTYLE),
        Err(DecodeError::UnknownClientFlags(2))
    );
    assert!(matches!(decode_client_flags(&[0, 0], offered), Err(DecodeError::Truncated { .. })));
    let enc = ClientFlags { fixed_newstyle: true, no_zeroes: false }.encode();
    assert_eq!(enc, [0, 0, 0, 1]);
}

#[test]
fn option_header_round_trips_and_refuses_bad_magic() {
    let h = OptionHeader { option: NBD_OPT_GO, length: 12 };
    assert_eq!(OptionHeader::decode(&h.encode()), Ok(h));
    let mut bad = h.encode();
    bad[7] ^= 1;
    assert!(matches!(OptionHeader::decode(&bad), Err(DecodeError::BadMagic { expected: IHAVEOPT, .. })));
    assert!(matches!(OptionHeader::decode(&bad[..15]), Err(DecodeError::Truncated { need: 16, have: 15 })));
}

// ----- options -----------------------------------------------------------------------

#[test]
fn export_name_option_decodes_strings() {
    assert_eq!(
        ClientOption::decode(NBD_OPT_EXPORT_NAME, b"disk"),
        Ok(ClientOption::ExportName("disk".into()))
    );
    assert_eq!(ClientOption::decode(NBD_OPT_EXPORT_NAME, b""), Ok(ClientOption::ExportName(String::new())));
    let e = ClientOption::decode(NBD_OPT_EXPORT_NAME, b"a\0b").unwrap_err();
    assert_eq!(e.reason, "string contains NUL");
    assert!(ClientOption::decode(NBD_OPT_EXPORT_NAME, &[0xff, 0xfe]).is_err());
    assert!(ClientOption::decode(NBD_OPT_EXPORT_NAME, &vec![b'a'; 4097]).is_err());
    assert!(ClientOption::decode(NBD_OPT_EXPORT_NAME, &vec![b'a'; 4096]).is_ok());
}

#[test]
fn dataless_options_refuse_data_except_abort() {
    assert_eq!(ClientOption::decode(NBD_OPT_ABORT, b""), Ok(ClientOption::Abort));
    assert_eq!(ClientOption::decode(NBD_OPT_ABORT, b"junk"), Ok(ClientOption::Abort));
    assert_eq!(ClientOption::decode(NBD_OPT_LIST, b""), Ok(ClientOption::List));
    assert_eq!(ClientOption::decode(NBD_OPT_STARTTLS, b""), Ok(ClientOption::StartTls));
    assert_eq!(ClientOption::decode(NBD_OPT_STRUCTURED_REPLY, b""), Ok(ClientOption::StructuredReply));
    for opt in [NBD_OPT_LIST, NBD_OPT_STARTTLS, NBD_OPT_STRUCTURED_REPLY] {
        let e = ClientOption::decode(opt, b"x").unwrap_err();
        assert_eq!(e.option, opt);
        assert_eq!(e.reason, "unexpected data");
    }
}

#[test]
fn info_and_go_decode_name_and_requests() {
    let p = info_payload("disk", &[NBD_INFO_NAME, NBD_INFO_BLOCK_SIZE]);
    let want = InfoRequest { name: "disk".into(), requests: vec![1, 3] };
    assert_eq!(ClientOption::decode(NBD_OPT_GO, &p), Ok(ClientOption::Go(want.clone())));
    assert_eq!(ClientOption::decode(NBD_OPT_INFO, &p), Ok(ClientOption::Info(want)));
    let empty = info_payload("", &[]);
    assert_eq!(ClientOption::decode(NBD_OPT_GO, &empty), Ok(ClientOption::Go(InfoRequest::default())));
}

#[test]
fn info_refuses_malformed_payloads() {
    let good = info_payload("disk", &[1, 2]);
    // Every truncation is refused.
    for cut in 0..good.len() {
        assert!(ClientOption::decode(NBD_OPT_GO, &good[..cut]).is_err(), "cut at {cut}");
    }
    // Trailing bytes.
    let mut long = good.clone();
    long.push(0);
    assert_eq!(
        ClientOption::decode(NBD_OPT_GO, &long).unwrap_err().reason,
        "trailing bytes after information requests"
    );
    // Name length pointing far past the end.
    let lie = opt_data(&[&u32::MAX.to_be_bytes(), b"abc"]);
    assert_eq!(
        ClientOption::decode(NBD_OPT_INFO, &lie).unwrap_err().reason,
        "name runs past the option data"
    );
    // Request count larger than the data.
    let lie = opt_data(&[&0u32.to_be_bytes(), &u16::MAX.to_be_bytes(), &[0, 1]]);
    assert!(ClientOption::decode(NBD_OPT_INFO, &lie).is_err());
    // Name with NUL.
    let nul = info_payload("a\0", &[]);
    assert_eq!(ClientOption::decode(NBD_OPT_GO, &nul).unwrap_err().reason, "string contains NUL");
}

#[test]
fn meta_context_options_decode_queries() {
    let p = meta_payload("disk", &["base:allocation", "mcow:"]);
    let want =
        MetaContextQuery { export: "disk".into(), queries: vec!["base:allocation".into(), "mcow:".into()] };
    assert_eq!(
        ClientOption::decode(NBD_OPT_SET_META_CONTEXT, &p),
        Ok(ClientOption::SetMetaContext(want.clone()))
    );
    assert_eq!(ClientOption::decode(NBD_OPT_LIST_META_CONTEXT, &p), Ok(ClientOption::ListMetaContext(want)));
    let none = meta_payload("", &[]);
    assert_eq!(
        ClientOption::decode(NBD_OPT_LIST_META_CONTEXT, &none),
        Ok(ClientOption::ListMetaContext(MetaContextQuery::default()))
    );
}

#[test]
fn meta_context_refuses_malformed_payloads() {
    let good = meta_payload("d", &["base:allocation"]);
    for cut in 0..good.len() {
        assert!(ClientOption::decode(NBD_OPT_SET_META_CONTEXT, &good[..cut]).is_err(), "cut at {cut}");
    }
    let mut long = good.clone();
    long.push(b'x');
    assert!(ClientOption::decode(NBD_OPT_SET_META_CONTEXT, &long).is_err());
    // A huge query count is refused before anything is allocated for it.
    let lie = opt_data(&[&0u32.to_be_bytes(), &u32::MAX.to_be_bytes()]);
    assert_eq!(
        ClientOption::decode(NBD_OPT_SET_META_CONTEXT, &lie).unwrap_err().reason,
        "query count exceeds the option data"
    );
    let bad_query = opt_data(&[&0u32.to_be_bytes(), &1u32.to_be_bytes(), &2u32.to_be_bytes(), &[0xc3, 0x28]]);
    assert_eq!(
        ClientOption::decode(NBD_OPT_LIST_META_CONTEXT, &bad_query).unwrap_err().reason,
        "string is not UTF-8"
    );
}

#[test]
fn unknown_options_are_reported_not_refused() {
    for code in [0, NBD_OPT_PEEK_EXPORT, NBD_OPT_EXTENDED_HEADERS, 12, 0xdead_beef] {
        assert_eq!(ClientOption::decode(code, b"whatever"), Ok(ClientOption::Unknown(code)));
    }
}

#[test]
fn every_option_round_trips_through_the_client_encoder() {
    let opts = [
        ClientOption::ExportName("x".into()),
        ClientOption::Abort,
        ClientOption::List,
        ClientOption::StartTls,
        ClientOption::Info(InfoRequest { name: "n".into(), requests: vec![0, 1, 2, 3] }),
        ClientOption::Go(InfoRequest { name: "".into(), requests: vec![] }),
        ClientOption::StructuredReply,
        ClientOption::ListMetaContext(MetaContextQuery { export: "e".into(), queries: vec!["base:".into()] }),
        ClientOption::SetMetaContext(MetaContextQuery { export: "".into(), queries: vec![] }),
        ClientOption::Unknown(99),
    ];
    for o in opts {
        let wire = o.encode();
        let h = OptionHeader::decode(&wire).unwrap();
        assert_eq!(h.length as usize, wire.len() - OPTION_HEADER_LEN);
        assert_eq!(ClientOption::decode(h.option, &wire[OPTION_HEADER_LEN..]), Ok(o));
    }
}

// ----- option replies ----------------------------------------------------------------

fn reply_bytes(opt: u32, r: OptionReply<'_>) -> (OptionReplyHeader, Vec<u8>) {
    let mut out = Vec::new();
    r.encode(opt, &mut out);
    let h = OptionReplyHeader::decode(&out).unwrap();
    assert_eq!(h.length as usize, out.len() - OPTION_REPLY_HEADER_LEN);
    (h, out[OPTION_REPLY_HEADER_LEN..].to_vec())
}

#[test]
fn option_replies_encode_their_payloads() {
    let (h, d) = reply_bytes(NBD_OPT_GO, OptionReply::Ack);
    assert_eq!((h.option, h.reply_type, d.len()), (NBD_OPT_GO, NBD_REP_ACK, 0));

    let (h, d) = reply_bytes(NBD_OPT_LIST, OptionReply::Server { name: "disk", description: "desc" });
    assert_eq!(h.reply_type, NBD_REP_SERVER);
    assert_eq!(d, opt_data(&[&4u32.to_be_bytes(), b"disk", b"desc"]));

    let (h, d) = reply_bytes(NBD_OPT_GO, OptionReply::InfoExport { size: 0x1122, flags: 0x0103 });
    assert_eq!(h.reply_type, NBD_REP_INFO);
    assert_eq!(d, opt_data(&[&0u16.to_be_bytes(), &0x1122u64.to_be_bytes(), &0x0103u16.to_be_bytes()]));

    let (_, d) = reply_bytes(NBD_OPT_GO, OptionReply::InfoName("n"));
    assert_eq!(d, opt_data(&[&1u16.to_be_bytes(), b"n"]));
    let (_, d) = reply_bytes(NBD_OPT_GO, OptionReply::InfoDescription("dd"));
    assert_eq!(d, opt_data(&[&2u16.to_be_bytes(), b"dd"]));
    let bs = BlockSizes { minimum: 1, preferred: 4096, maximum: 1 << 25 };
    let (_, d) = reply_bytes(NBD_OPT_INFO, OptionReply::InfoBlockSize(bs));
    assert_eq!(
        d,
        opt_data(&[
            &3u16.to_be_bytes(),
            &1u32.to_be_bytes(),
            &4096u32.to_be_bytes(),
            &(1u32 << 25).to_be_bytes()
        ])
    );

    let (h, d) =
        reply_bytes(NBD_OPT_SET_META_CONTEXT, OptionReply::MetaContext { id: 2, name: "base:allocation" });
    assert_eq!(h.reply_type, NBD_REP_META_CONTEXT);
    assert_eq!(d, opt_data(&[&2u32.to_be_bytes(), b"base:allocation"]));

    let long = "é".repeat(3000);
    let (h, d) = reply_bytes(7, OptionReply::Error { code: NBD_REP_ERR_UNSUP, message: &long });
    assert_eq!(h.reply_type, NBD_REP_ERR_UNSUP);
    assert!(d.len() <= MAX_STRING_LEN);
    assert!(std::str::from_utf8(&d).is_ok(), "message cut on a character boundary");
    assert!(OptionReplyHeader::decode(&[0u8; 20]).is_err());
}

#[test]
fn error_reply_types_have_the_error_bit() {
    for c in [
        NBD_REP_ERR_UNSUP,
        NBD_REP_ERR_POLICY,
        NBD_REP_ERR_INVALID,
        NBD_REP_ERR_PLATFORM,
        NBD_REP_ERR_TLS_REQD,
        NBD_REP_ERR_UNKNOWN,
        NBD_REP_ERR_SHUTDOWN,
        NBD_REP_ERR_BLOCK_SIZE_REQD,
        NBD_REP_ERR_TOO_BIG,
    ] {
        assert_eq!(c & 0x8000_0000, 0x8000_0000);
    }
    assert_eq!(NBD_REP_ERR_UNSUP, 0x8000_0001);
    assert_eq!(NBD_REP_ERR_TOO_BIG, 0x8000_0009);
}

#[test]
fn export_name_reply_pads_unless_no_zeroes() {
    let r = encode_export_name_reply(1 << 30, 0x1234, false);
    assert_eq!(r.len(), 134);
    assert_eq!(&r[..8], &(1u64 << 30).to_be_bytes());
    assert_eq!(&r[8..10], &0x1234u16.to_be_bytes());
    assert!(r[10..].iter().all(|&b| b == 0));
    assert_eq!(encode_export_name_reply(5, 1, true).len(), 10);
}

// ----- requests ----------------------------------------------------------------------

#[test]
fn request_round_trips_and_refuses_bad_magic() {
    let r = req(Command::Write, NBD_CMD_FLAG_FUA, 4096, 512);
    let wire = r.encode();
    assert_eq!(&wire[..4], &[0x25, 0x60, 0x95, 0x13]);
    assert_eq!(Request::decode(&wire), Ok(r));
    assert_eq!(r.payload_len(), 512);
    assert_eq!(req(Command::Read, 0, 0, 512).payload_len(), 0);
    let mut bad = wire;
    bad[0] = 0;
    assert!(matches!(Request::decode(&bad), Err(DecodeError::BadMagic { .. })));
    assert!(matches!(Request::decode(&wire[..27]), Err(DecodeError::Truncated { need: 28, have: 27 })));
}

#[test]
fn every_command_maps_to_and_from_the_wire() {
    for (v, c) in [
        (0, Command::Read),
        (1, Command::Write),
        (2, Command::Disc),
        (3, Command::Flush),
        (4, Command::Trim),
        (5, Command::Cache),
        (6, Command::WriteZeroes),
        (7, Command::BlockStatus),
        (8, Command::Unknown(8)),
        (0xffff, Command::Unknown(0xffff)),
    ] {
        assert_eq!(Command::from_wire(v), c);
        assert_eq!(c.to_wire(), v);
    }
}

#[test]
fn valid_requests_pass_the_check() {
    let p = params();
    for r in [
        req(Command::Read, 0, 0, 4096),
        req(Command::Read, NBD_CMD_FLAG_DF, (1 << 20) - 1, 1),
        req(Command::Read, NBD_CMD_FLAG_FUA, 0, 0),
        req(Command::Write, NBD_CMD_FLAG_FUA, 0, 1 << 20),
        req(Command::Flush, 0, 0, 0),
        req(Command::Flush, 0, u64::MAX, u32::MAX),
        req(Command::Trim, NBD_CMD_FLAG_FUA, 0, 1 << 20),
        req(Command::Cache, 0, 512, 512),
        req(
            Command::WriteZeroes,
            NBD_CMD_FLAG_NO_HOLE | NBD_CMD_FLAG_FAST_ZERO | NBD_CMD_FLAG_FUA,
            0,
            1 << 20,
        ),
        req(Command::BlockStatus, NBD_CMD_FLAG_REQ_ONE, 0, 1 << 20),
    ] {
        assert_eq!(r.check(&p), Ok(()), "{r:?}");
    }
}

#[test]
fn unknown_commands_and_flags_are_einval() {
    let p = params();
    assert_eq!(req(Command::Unknown(9), 0, 0, 0).check(&p).unwrap_err().errno, NBD_EINVAL);
    assert_eq!(req(Command::Read, 1 << 9, 0, 1).check(&p).unwrap_err().errno, NBD_EINVAL);
    assert_eq!(req(Command::Read, NBD_CMD_FLAG_NO_HOLE, 0, 1).check(&p).unwrap_err().errno, NBD_EINVAL);
    assert_eq!(req(Command::Write, NBD_CMD_FLAG_REQ_ONE, 0, 1).check(&p).unwrap_err().errno, NBD_EINVAL);
    assert_eq!(req(Command::BlockStatus, NBD_CMD_FLAG_DF, 0, 1).check(&p).unwrap_err().errno, NBD_EINVAL);
    // DF is only meaningful with structured replies.
    let simple = TransmissionParams { structured: false, ..p };
    assert_eq!(req(Command::Read, NBD_CMD_FLAG_DF, 0, 1).check(&simple).unwrap_err().errno, NBD_EINVAL);
}

#[test]
fn writes_to_read_only_exports_are_eperm() {
    let p = TransmissionParams { read_only: true, ..params() };
    for c in [Command::Write, Command::Trim, Command::WriteZeroes] {
        assert_eq!(req(c, 0, 0, 512).check(&p).unwrap_err().errno, NBD_EPERM, "{c}");
    }
    assert_eq!(req(Command::Read, 0, 0, 512).check(&p), Ok(()));
    assert_eq!(req(Command::Flush, 0, 0, 0).check(&p), Ok(()));
}

#[test]
fn requests_past_the_end_are_einval_or_enospc() {
    let p = params();
    let end = p.size;
    assert_eq!(req(Command::Read, 0, end, 1).check(&p).unwrap_err().errno, NBD_EINVAL);
    assert_eq!(req(Command::Read, 0, u64::MAX, 1).check(&p).unwrap_err().errno, NBD_EINVAL);
    assert_eq!(req(Command::Cache, 0, end - 1, 2).check(&p).unwrap_err().errno, NBD_EINVAL);
    assert_eq!(req(Command::BlockStatus, 0, end, 1).check(&p).unwrap_err().errno, NBD_EINVAL);
    assert_eq!(req(Command::Write, 0, end - 1, 2).check(&p).unwrap_err().errno, NBD_ENOSPC);
    assert_eq!(req(Command::Trim, 0, u64::MAX, u32::MAX).check(&p).unwrap_err().errno, NBD_ENOSPC);
    assert_eq!(req(Command::WriteZeroes, 0, end, 1).check(&p).unwrap_err().errno, NBD_ENOSPC);
    assert_eq!(req(Command::Read, 0, end, 0).check(&p), Ok(()), "zero bytes at the end is in bounds");
}

#[test]
fn oversized_payloads_are_einval_but_not_for_payload_free_commands() {
    let p = TransmissionParams { size: u64::MAX, ..params() };
    let big = p.max_payload + 1;
    assert_eq!(req(Command::Read, 0, 0, big).check(&p).unwrap_err().errno, NBD_EINVAL);
    assert_eq!(req(Command::Write, 0, 0, big).check(&p).unwrap_err().errno, NBD_EINVAL);
    for c in [Command::Trim, Command::WriteZeroes, Command::Cache, Command::BlockStatus] {
        assert_eq!(req(c, 0, 0, u32::MAX).check(&p), Ok(()), "{c}");
    }
}

#[test]
fn block_status_needs_negotiated_contexts_and_a_length() {
    let p = params();
    assert_eq!(req(Command::BlockStatus, 0, 0, 0).check(&p).unwrap_err().errno, NBD_EINVAL);
    let none = TransmissionParams { meta_contexts: 0, ..p };
    assert_eq!(req(Command::BlockStatus, 0, 0, 1).check(&none).unwrap_err().errno, NBD_EINVAL);
    let simple = TransmissionParams { structured: false, ..p };
    assert_eq!(req(Command::BlockStatus, 0, 0, 1).check(&simple).unwrap_err().errno, NBD_EINVAL);
}

// ----- transmission replies ----------------------------------------------------------

#[test]
fn simple_reply_layout() {
    let r = encode_simple_reply(NBD_EIO, 0x0102_0304_0506_0708);
    assert_eq!(&r[..4], &SIMPLE_REPLY_MAGIC.to_be_bytes());
    assert_eq!(
        ReplyHeader::decode(&r),
        Ok(ReplyHeader::Simple(SimpleReply { error: 5, handle: 0x0102_0304_0506_0708 }))
    );
}

#[test]
fn structured_chunks_layout() {
    let p = encode_offset_data_prefix(9, 4096, 100, true).unwrap();
    let ReplyHeader::Chunk(h) = ReplyHeader::decode(&p).unwrap() else { panic!("not a chunk") };
    assert_eq!(
        (h.flags, h.kind, h.handle, h.length),
        (NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_OFFSET_DATA, 9, 108)
    );
    assert_eq!(&p[20..], &4096u64.to_be_bytes());
    assert!(encode_offset_data_prefix(9, 0, u32::MAX as usize, true).is_none(), "too big for one chunk");

    let hole = encode_offset_hole(3, 512, 1024, false);
    let ReplyHeader::Chunk(h) = ReplyHeader::decode(&hole).unwrap() else { panic!("not a chunk") };
    assert_eq!((h.flags, h.kind, h.length), (0, NBD_REPLY_TYPE_OFFSET_HOLE, 12));
    assert_eq!(&hole[28..], &1024u32.to_be_bytes());

    let none = encode_none_chunk(4);
    let ReplyHeader::Chunk(h) = ReplyHeader::decode(&none).unwrap() else { panic!("not a chunk") };
    assert_eq!((h.flags, h.kind, h.length), (NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_NONE, 0));

    let mut out = Vec::new();
    encode_error_chunk(&mut out, 5, NBD_EINVAL, "bad");
    let ReplyHeader::Chunk(h) = ReplyHeader::decode(&out).unwrap() else { panic!("not a chunk") };
    assert_eq!((h.flags, h.kind, h.length), (NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_ERROR, 9));
    assert_eq!(&out[20..], opt_data(&[&22u32.to_be_bytes(), &3u16.to_be_bytes(), b"bad"]).as_slice());
    // A zero error is never sent in an error chunk.
    let mut out = Vec::new();
    encode_error_chunk(&mut out, 5, 0, "");
    assert_eq!(&out[20..24], &NBD_EIO.to_be_bytes());

    let mut out = Vec::new();
    assert!(encode_block_status_chunk(&mut out, 6, 1, &[(4096, 3), (512, 0)], true));
    let ReplyHeader::Chunk(h) = ReplyHeader::decode(&out).unwrap() else { panic!("not a chunk") };
    assert_eq!((h.kind, h.length), (NBD_REPLY_TYPE_BLOCK_STATUS, 20));
    assert_eq!(
        &out[20..],
        opt_data(&[
            &1u32.to_be_bytes(),
            &4096u32.to_be_bytes(),
            &3u32.to_be_bytes(),
            &512u32.to_be_bytes(),
            &[0; 4]
        ])
        .as_slice()
    );
    let mut out = Vec::new();
    assert!(!encode_block_status_chunk(&mut out, 6, 1, &[], true));
    assert!(out.is_empty());
    assert!(ReplyHeader::decode(&[1, 2, 3, 4, 5]).is_err());
}

#[test]
fn extents_are_clipped_merged_and_limited() {
    let e = |length, flags| StatusExtent { length, flags };
    // Clipped to the request, zero lengths dropped, neighbours merged.
    let raw = [e(100, 3), e(0, 1), e(50, 3), e(1 << 40, 0)];
    assert_eq!(normalize_extents(&raw, 1000, false, 16), vec![(150, 3), (850, 0)]);
    // REQ_ONE keeps the first run only (merging still applies).
    assert_eq!(normalize_extents(&raw, 1000, true, 16), vec![(150, 3)]);
    // A cap on descriptors.
    let many: Vec<_> = (0..10).map(|i| e(10, i % 2)).collect();
    assert_eq!(normalize_extents(&many, 1000, false, 3).len(), 3);
    // Nothing usable.
    assert!(normalize_extents(&[e(0, 1)], 10, false, 16).is_empty());
    assert!(normalize_extents(&[], 10, false, 16).is_empty());
    // Lengths above u32 are capped to the request.
    assert_eq!(normalize_extents(&[e(u64::MAX, 2)], u32::MAX, false, 16), vec![(u32::MAX, 2)]);
}

#[test]
fn truncation_respects_char_boundaries() {
    assert_eq!(truncate_str("héllo", 2), "h");
    assert_eq!(truncate_str("héllo", 3), "hé");
    assert_eq!(truncate_str("abc", 10), "abc");
}

// ----- fuzz entry points on stable -----------------------------------------------------

/// A small deterministic generator (xorshift) so the "fuzz" loop is reproducible.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn bytes(&mut self, max: usize) -> Vec<u8> {
        let n = (self.next() % (max as u64 + 1)) as usize;
        (0..n).map(|_| self.next() as u8).collect()
    }
}

#[test]
fn fuzz_entry_points_survive_random_input() {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    for _ in 0..20_000 {
        let mut data = rng.bytes(96);
        // Bias half the inputs toward valid magics so deeper code is reached.
        if rng.next().is_multiple_of(2) && data.len() >= 4 {
            data[..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        }
        crate::fuzz::option_decoding(&data);
        crate::fuzz::request_decoding(&data);
    }
    // Structured inputs: valid options with random payload tails.
    for code in 0..16u32 {
        for _ in 0..200 {
            let mut data = code.to_be_bytes().to_vec();
            let tail = rng.bytes(40);
            data.extend_from_slice(&(tail.len() as u32 / 2).to_be_bytes());
            data.extend_from_slice(&tail);
            crate::fuzz::option_decoding(&data);
        }
    }
}

#[test]
fn fuzz_session_survives_random_input() {
    let mut rng = Rng(0x2545_f491_4f6c_dd1d);
    for i in 0..300 {
        let mut data = vec![(i % 2) as u8 | 1];
        // Random requests with valid magic, random commands, offsets and lengths.
        for _ in 0..(rng.next() % 8) {
            let r = Request {
                flags: (rng.next() % 64) as u16,
                command: Command::from_wire((rng.next() % 10) as u16),
                handle: rng.next(),
                offset: rng.next() % (2 << 20),
                length: (rng.next() % (1 << 17)) as u32,
            };
            data.extend_from_slice(&r.encode());
            if r.command == Command::Write {
                let n = (rng.next() % 4096) as usize;
                data.extend(std::iter::repeat_n(0xab, n));
            }
        }
        if i % 3 == 0 {
            data.extend(rng.bytes(64));
        }
        let _ = crate::fuzz::session(&data);
    }
    for _ in 0..200 {
        let data = rng.bytes(200);
        let _ = crate::fuzz::session(&data);
    }
}

#[test]
fn fuzz_session_serves_a_valid_read() {
    let mut data = vec![1u8];
    data.extend_from_slice(
        &Request { flags: 0, command: Command::Read, handle: 42, offset: 0, length: 4096 }.encode(),
    );
    let out = crate::fuzz::session(&data);
    // The tail of the output is the read reply: a single hole chunk for zeroes.
    let hole = encode_offset_hole(42, 0, 4096, true);
    assert!(out.ends_with(&hole), "read reply missing from {} bytes of output", out.len());
}
