#!/usr/bin/env node
// A Node gRPC client of the attribution service, for the interop test
// (tests/e2e/test_node_interop.py): it loads protos/ at run time with
// @grpc/proto-loader, as a Node shop or dashboard would, then
//   creates a campaign, an affiliate and a limited coupon (CatalogService),
//   records a click and a conversion with that click and code (TrackingService),
//   reads them back (GetClick, GetConversion, GetCoupon)
// and prints one JSON object on stdout. Field names are the proto names,
// enums their full names, int64 values decimal strings (as proto3 JSON).
//
//   node tools/node/interop.js --addr 127.0.0.1:50051
//
// ASCRIBE_ADMIN_TOKEN and ASCRIBE_INTERNAL_TOKEN, when set, go as bearer
// tokens: the admin token on admin RPCs, the internal one on recording RPCs.
// Any failed call prints its status on stderr and exits 1.
"use strict";

const crypto = require("node:crypto");
const path = require("node:path");
const grpc = require("@grpc/grpc-js");
const protoLoader = require("@grpc/proto-loader");

const PROTOS = path.resolve(__dirname, "..", "..", "protos");
const DEADLINE_MS = 10000;
const MINUTE_S = 60;
const BROWSER_UA =
  "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 " +
  "(KHTML, like Gecko) Chrome/126.0.0.0 Safari/537.36";

function parseArgs(argv) {
  const args = { addr: process.env.ASCRIBE_ATTRIBUTION_ADDR || "127.0.0.1:50051" };
  for (let i = 0; i < argv.length; i += 1) {
    if (argv[i] === "--addr" && i + 1 < argv.length) {
      args.addr = argv[i + 1];
      i += 1;
    } else {
      throw new Error(`unknown argument ${argv[i]} (usage: interop.js [--addr HOST:PORT])`);
    }
  }
  return args;
}

function loadServices(addr) {
  const definition = protoLoader.loadSync("ascribe/attribution/v1/attribution.proto", {
    includeDirs: [PROTOS],
    keepCase: true, // proto field names, as the contract writes them
    longs: String, // int64 money and counts exactly
    enums: String,
    defaults: true,
    oneofs: true,
  });
  const v1 = grpc.loadPackageDefinition(definition).ascribe.attribution.v1;
  const credentials = grpc.credentials.createInsecure();
  return {
    catalog: new v1.CatalogService(addr, credentials),
    tracking: new v1.TrackingService(addr, credentials),
  };
}

function bearer(token) {
  const metadata = new grpc.Metadata();
  if (token) {
    metadata.set("authorization", `Bearer ${token}`);
  }
  return metadata;
}

// One unary call with a deadline, as a promise; a failure names the RPC.
function call(client, method, request, metadata) {
  return new Promise((resolve, reject) => {
    const deadline = new Date(Date.now() + DEADLINE_MS);
    client[method](request, metadata, { deadline }, (error, response) => {
      if (error) {
        reject(new Error(`${method}: ${grpc.status[error.code]} (${error.code}): ${error.details}`));
      } else {
        resolve(response);
      }
    });
  });
}

function timestamp(secondsFromNow) {
  return { seconds: String(Math.floor(Date.now() / 1000) + secondsFromNow), nanos: 0 };
}

async function run({ addr }) {
  const { catalog, tracking } = loadServices(addr);
  const admin = bearer(process.env.ASCRIBE_ADMIN_TOKEN);
  const internal = bearer(process.env.ASCRIBE_INTERNAL_TOKEN);
  const suffix = crypto.randomBytes(4).toString("hex").toUpperCase();
  try {
    const campaign = await call(catalog, "CreateCampaign", {
      campaign: {
        name: `Node interop ${suffix}`,
        landing_url: "https://shop.example/node",
        currency: "EUR",
        payout_micros: "5000000",
      },
    }, admin);
    const affiliate = await call(catalog, "CreateAffiliate", {
      affiliate: { name: `Node affiliate ${suffix}`, channel: "social" },
    }, admin);
    const code = `NODE-${suffix}`;
    const created = await call(catalog, "CreateCoupon", {
      coupon: {
        campaign_id: campaign.id,
        code,
        kind: "COUPON_KIND_GENERAL",
        usage_limit: "5",
        affiliate_ids: [affiliate.id],
      },
    }, admin);
    // The click happened ten minutes before the order: a sale seconds after
    // its click is the fraud rule ctit_too_short.
    const click = await call(tracking, "RecordClick", {
      campaign_id: campaign.id,
      affiliate_id: affiliate.id,
      coupon_code: code.toLowerCase(),
      sub1: "node",
      ip: "203.0.113.9",
      user_agent: BROWSER_UA,
      occurred_at: timestamp(-10 * MINUTE_S),
    }, internal);
    const orderId = `node-order-${suffix}`;
    const conversion = await call(tracking, "RecordConversion", {
      campaign_id: campaign.id,
      order_id: orderId,
      click_id: click.click_id,
      coupon_code: code,
      amount_micros: "49900000",
      discount_micros: "5000000",
      currency: "EUR",
      customer_id: `node-customer-${suffix}`,
      ip: "203.0.113.9",
      user_agent: BROWSER_UA,
      occurred_at: timestamp(0),
      postback_token: campaign.postback_token,
    }, internal);
    const readClick = await call(tracking, "GetClick", { click_id: click.click_id }, admin);
    const readConversion = await call(tracking, "GetConversion", {
      campaign_id: campaign.id,
      order_id: orderId,
    }, admin);
    const readCoupon = await call(catalog, "GetCoupon", { campaign_id: campaign.id, code }, admin);
    return {
      campaign_id: campaign.id,
      affiliate_id: affiliate.id,
      code,
      order_id: orderId,
      created: { coupon: created, click, conversion },
      read: { click: readClick, conversion: readConversion, coupon: readCoupon },
    };
  } finally {
    catalog.close();
    tracking.close();
  }
}

run(parseArgs(process.argv.slice(2))).then(
  (result) => {
    process.stdout.write(`${JSON.stringify(result, null, 2)}\n`);
  },
  (error) => {
    process.stderr.write(`interop: ${error.message}\n`);
    process.exitCode = 1;
  },
);
