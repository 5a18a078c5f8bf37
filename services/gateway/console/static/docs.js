// Swagger UI for /v1/docs, from the swagger-ui-bundle package's files (no CDN); a file, not inline, for the CSP.
"use strict";
window.ui = SwaggerUIBundle({url: "/v1/openapi.json", dom_id: "#swagger-ui", deepLinking: true,
  presets: [SwaggerUIBundle.presets.apis], layout: "BaseLayout"});
